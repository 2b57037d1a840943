"""GroupNorm: statistics per (sample, group) over channels-in-group and every spatial dim.

    group_norm(x: S(0)[B, C, H, W])  -> S(0)       samples are independent
    group_norm(x: S(2))              -> needs R in this version (exact global statistics TODO)
"""

from __future__ import annotations

from ..placements import REPLICATE, Replicate, Shard
from .core import Decision, OpView, replicate_all


def group_norm(op: OpView) -> Decision | None:
    x = op.node.args[0]
    p = op.pl(x)
    params = {t: REPLICATE for t in op.tensor_inputs()[1:] if not isinstance(op.pl(t), Replicate)}
    if isinstance(p, Shard) and p.dim == 0:
        return Decision(p, params)
    if isinstance(p, Replicate):
        return Decision(REPLICATE, params)
    return replicate_all(op, "group_norm statistics span the sharded dim")


TABLE = [
    (["group_norm"], group_norm),
]
