"""The surgeries that perform rules' local ops, one module per op family (mirroring ``rules/``),
merged into one table keyed by ``LocalOp.kind``. ``passes.lower`` is the one place that looks a
kind up here and applies it.

A newcomer adding a rule whose op runs differently on each rank returns
``Decision(..., local=local_op("my_kind", p=1))`` from the rule and adds
``("my_kind", my_surgery)`` to the ``TABLE`` of the family's module here (``base.Surgery``).
"""

from __future__ import annotations

from . import cat_split, conv, group_norm, indexing, linear, norm, reduction, resample, roll, view
from .base import LocalContext, Surgery

SURGERIES: dict[str, Surgery] = {}
for _family in (group_norm, reduction, roll, conv, cat_split, indexing, view, resample, linear, norm):
    for _kind, _surgery in _family.TABLE:
        if _kind in SURGERIES:
            raise RuntimeError(f"local op {_kind!r} has surgeries in two families ({_family.__name__})")
        SURGERIES[_kind] = _surgery

__all__ = ["SURGERIES", "LocalContext", "Surgery"]
