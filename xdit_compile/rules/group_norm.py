"""GroupNorm: statistics per (sample, group) over channels-in-group and every spatial dim.

    group_norm(x: S(0)[B, C, H, W])       -> S(0)    samples are independent
    group_norm(x: S(d)[B, C, ...], d >= 2) -> S(d)   exact global statistics: float32 partial
                                                     sums of x and x*x all-reduced over the axis
    group_norm(x: S(1))                   -> needs R (a group's channels would be split)

Any shard of a spatial dim qualifies (uneven, several segments, rows of tokens): the sums do
not care which elements a rank holds. The local op ``group_norm_stats`` calls
``runtime.halo.group_norm`` (``passes/local_ops/group_norm.py``).
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..graph import shape
from ..placements import REPLICATE, Replicate, Shard
from .core import Comm, Decision, OpView, local_op, on_first_shard, replicate_all

@on_first_shard
def group_norm(op: OpView, x: fx.Node, p: Shard, params: dict) -> Decision | None:
    if p.dim == 0:
        return Decision(p, params)
    if p.dim == 1 or op.name != "group_norm" or op.node.op != "call_function":
        return replicate_all(op, "group_norm statistics span the sharded channels")
    s = shape(x)
    groups = op.arg(1, "num_groups")
    count = (int(s[1]) // int(groups)) * math.prod(int(d) for d in s[2:])  # global shape here
    return Decision(p, params, local=local_op("group_norm_stats", count=count),
                    comm=Comm(1, float(shape(x)[0] * op.arg(1, "num_groups", 1) * 8)))


def group_norm_rule(op: OpView) -> Decision | None:
    """``xdit_group_norm`` met again on another axis: a batch shard keeps it exact."""
    p = op.pl(op.node.args[0])
    if isinstance(p, Replicate):
        return Decision(REPLICATE)
    if isinstance(p, Shard) and p.dim == 0:
        return Decision(p)
    return None


TABLE = [
    (["group_norm"], group_norm),
    (["xdit_group_norm"], group_norm_rule),
]
