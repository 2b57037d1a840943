"""Byte sizes as users write them (``"24GiB"``) and as reports print them (``0.47 MiB``).

Below ``plan.py`` (which parses ``memory_budget`` with it) and ``memory.py``; imports only the errors.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import PlanError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: Any, option: str = "memory_budget") -> int | None:
    """``memory_budget`` as bytes: an int, or a string with a unit (``"20GiB"``, ``"24 GB"``,
    ``"512MiB"``, ``"1.5GiB"``; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024); None stays None."""
    fix = (f"use a positive int of bytes or a string with a unit, e.g. {option}=24 * 2**30 or "
           f"{option}='24GiB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PlanError(f"option {option}={value!r} ({type(value).__name__}) is not accepted: {fix}")
    if isinstance(value, int):
        if value <= 0:
            raise PlanError(f"option {option}={value} is not accepted: a budget must be more than 0 bytes; {fix}")
        return value
    m = _BYTES.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise PlanError(f"option {option}={value!r} is not accepted (not a number with a known unit): {fix}")
    nbytes = int(float(m.group(1)) * _UNITS[unit])
    if nbytes <= 0:
        raise PlanError(f"option {option}={value!r} is not accepted ({nbytes} bytes): a budget must be more than 0 bytes; {fix}")
    return nbytes


def fmt_bytes(n: float) -> str:
    """Bytes with a binary unit, two decimals: ``0.47 MiB``, ``28.00 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
