"""The attention strategies, in the order ``lower`` tries them; the first that applies wins.

Adding a strategy: one file with a ``Strategy`` subclass (see ``base.py``) and one line here
(or ``register`` at run time, e.g. in a test). PipeFusion looks its strategies up by name.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from ..axes import SEQUENCE, axis_names, axis_spec
from ..axis import Axis
from ..errors import PassError
from .base import Cost, Site, Strategy
from .fill_kv import FillKV
from .local import Local
from .ring import Ring
from .stale_kv import StaleKV
from .ulysses import Ulysses
from .usp import Usp

STRATEGIES: list[Strategy] = [
    Ulysses(),
    Usp(),
    Ring(),  # applies everywhere: the fallback
    Local(),
    FillKV(),
    StaleKV(),
]

# The strategy whose cost the plan search charges for a sequence-sharded attention: it chooses
# seeds before the sp ranks' ring x ulysses split matters (kept as it was: plans do not move).
PLANNING = "ulysses"


def get(name: str) -> Strategy:
    for s in STRATEGIES:
        if s.name == name:
            return s
    raise PassError(f"no attention strategy named {name!r}; registered: {[s.name for s in STRATEGIES]}")


def choose(site: Site) -> tuple[Strategy, tuple[tuple[str, str], ...]]:
    """The first automatic strategy that applies to ``site``, and (name, why not) of those before it."""
    rejected: list[tuple[str, str]] = []
    # A registered axis names its strategies (axes.py); PipeFusion's patch axis is not registered.
    allowed = axis_spec(site.axis.name).strategies if site.axis.name in axis_names() else None
    for s in STRATEGIES:
        if not s.auto:
            continue
        reason = (f"not used on the {site.axis.name} axis (its AxisSpec.strategies: {list(allowed)})"
                  if allowed is not None and s.name not in allowed else s.why_not(site))
        if reason is None:
            return s, tuple(rejected)
        rejected.append((s.name, reason))
    raise PassError(f"no attention strategy applies to {site.node} on axis {site.axis.name} (n={site.axis.n}): "
                    + "; ".join(f"{n}: {r}" for n, r in rejected) + ". Register one that does (strategies/registry.py)")


def planning_cost(node: str, q_bytes: float, k_bytes: float, n: int) -> Cost:
    """What the plan search charges one sequence-sharded attention on an axis of ``n`` ranks."""
    site = Site(node, Axis(SEQUENCE, n, 0, "", ulysses=n), 1, 1, q_bytes, k_bytes)
    return get(PLANNING).cost(site)


def register(strategy: Strategy, before: str | None = None) -> None:
    """Add ``strategy`` (before the one named ``before``, else last); replaces one of its name."""
    unregister(strategy.name)
    at = len(STRATEGIES) if before is None else STRATEGIES.index(get(before))
    STRATEGIES.insert(at, strategy)


def unregister(name: str) -> None:
    STRATEGIES[:] = [s for s in STRATEGIES if s.name != name]


@contextlib.contextmanager
def registered(strategy: Strategy, before: str | None = None) -> Iterator[Strategy]:
    """``register`` for the duration of a ``with`` block (tests)."""
    register(strategy, before)
    try:
        yield strategy
    finally:
        unregister(strategy.name)
