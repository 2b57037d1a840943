"""Our own runtime ops, met again when a graph lowered on one axis is lowered on the next.

    xdit_slice(x: S(2), dim=0)    -> S(2)    a batch slice leaves the token shard alone
    xdit_gather(x: S(1), dim=0)   -> S(1)    so does a batch gather
    xdit_all_reduce(x: S(1))      -> S(1)    a sum over other ranks is elementwise here
    xdit_grad_sync(x: S(1))       -> S(1)    so is an identity (whose backward sums)
"""

from __future__ import annotations

from ..placements import REPLICATE, Partial, Replicate, Shard
from .core import Decision, OpView


def along_other_axis(op: OpView) -> Decision | None:
    x = op.node.args[0]
    p = op.pl(x)
    if isinstance(p, Replicate):
        return Decision(REPLICATE)
    dim = op.node.args[1] if len(op.node.args) > 1 and isinstance(op.node.args[1], int) else None
    if isinstance(p, Shard) and (dim is None or dim != p.dim):
        return Decision(p)
    if isinstance(p, Partial) and dim is not None:
        return Decision(p)
    return None


def elementwise_sum(op: OpView) -> Decision | None:
    p = op.pl(op.node.args[0])
    return Decision(p) if isinstance(p, (Replicate, Shard, Partial)) else None


TABLE = [
    (["xdit_slice", "xdit_gather"], along_other_axis),
    (["xdit_all_reduce", "xdit_grad_sync"], elementwise_sum),
]
