"""Our own runtime ops, met again when a graph lowered on one axis is lowered on the next.

    xdit_slice(x: S(2), dim=0)    -> S(2)    a batch slice leaves the token shard alone
    xdit_gather(x: S(1), dim=0)   -> S(1)    so does a batch gather
    xdit_all_reduce(x: S(1))      -> S(1)    a sum over other ranks is elementwise here
    xdit_grad_sync(x: S(1))       -> S(1)    so is an identity (whose backward sums)
    ulysses_attention(q, k, v: S(1)[B, H, S, D]) -> S(1)   heads split on this axis (tensor
        parallel after Ulysses): heads attend alone; Ulysses splits this rank's heads further
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import shape
from ..placements import REPLICATE, Partial, Placement, Replicate, Shard, is_even, same_layout
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


def heads_of_sequence_attention(op: OpView) -> Decision | None:
    """Ulysses / Ring attention (lowered on another axis) with its heads split on this one.

    Every head attends on its own, so q, k, v split alike on the heads dim run as they are; a
    mask with a heads dim of that size is split with them. Ulysses needs this rank's heads to
    divide over its group (``len(q_sizes)`` ranks): an uneven split has no rule (replicated).
    """
    q, k, v = op.node.args[:3]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return None
    p = next((op.pl(t) for t in (q, k, v) if isinstance(op.pl(t), Shard)), None)
    hd = len(shape(q)) - 3
    if not isinstance(p, Shard) or p.dim != hd or len(shape(k)) != len(shape(q)) or not is_even(p, op.n):
        return None
    if shape(k)[hd] != p.length or shape(v)[hd] != p.length:
        return None  # grouped K/V heads: no rule
    sizes = op.node.kwargs.get("q_sizes")
    if op.name == "ulysses_attention" and (not isinstance(sizes, (list, tuple)) or (p.length // op.n) % len(sizes)):
        return None
    needs: dict[fx.Node, Placement] = {t: p for t in (q, k, v) if not same_layout(op.pl(t), p, op.n)}
    mask = op.node.kwargs.get("mask")
    if isinstance(mask, fx.Node):
        ms = shape(mask)
        md = hd - (len(shape(q)) - len(ms))
        want: Placement = p.with_dim(md) if 0 <= md < len(ms) and ms[md] == p.length else REPLICATE
        if not same_layout(op.pl(mask), want, op.n):
            needs[mask] = want
    return Decision(p, needs)


TABLE = [
    (["ulysses_attention", "ring_attention"], heads_of_sequence_attention),
    (["xdit_slice", "xdit_gather"], along_other_axis),
    (["xdit_all_reduce", "xdit_grad_sync"], elementwise_sum),
]
