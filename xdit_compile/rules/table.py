"""Sharding rules, one module per op family, merged into one table keyed by op name."""

from __future__ import annotations

from typing import Callable

from . import (
    attention, cat_split, complex, conv, factory, group_norm, indexing, linear, norm, pointwise, reduction,
    resample, roll, runtime_ops, view,
)
from . import diagonal
from .core import Decision, OpView

Rule = Callable[[OpView], "Decision | None"]

RULES: dict[str, Rule] = {}
for _family in (
    pointwise, view, linear, norm, group_norm, reduction, cat_split, conv, attention, indexing, factory, runtime_ops,
    resample, complex, roll, diagonal,
):
    for _names, _rule in _family.TABLE:
        for _name in _names:
            if _name in RULES:
                raise RuntimeError(f"op {_name!r} has rules in two families ({_family.__name__})")
            RULES[_name] = _rule

__all__ = ["RULES", "Decision", "OpView", "Rule"]
