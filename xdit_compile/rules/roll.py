"""``torch.roll`` over a sharded tensor: local on other dims, a neighbour exchange on the sharded one.

Roll is separable (``roll(x, (a, b), (d, e)) == roll(roll(x, a, d), b, e)``), so the local op
``roll_exchange`` (``passes/local_ops/roll.py``) rolls the unsharded dims locally and replaces
the roll of the sharded dim by ``runtime.halo.roll_exchange``, which sends each rank the rows that leave its neighbours' shards
(``shift`` rows per rank when the shift is smaller than a shard):

    roll(x: S(1)[B, H, W, C], (-2, -2), (1, 2))  -> S(1)   local roll of W, exchange of 2 rows of H
    roll(x: S(1:16x16)[B, N, C], 11, 1)           -> S(1:16x16)   flat tokens: 11 tokens per rank
    roll(x: S(1), 3, 2)                            -> S(1)   another dim: purely local
    roll(x: S(1), 5)                               -> needs R  (no dims: a roll of the flattened tensor)
    roll(x: S(1:T+I), 1, 1)                        -> needs R  (several segments: not one cyclic order)

The shard keeps its placement (any single-segment shard, uneven and ``inner``-unit ones too).
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import shape, value
from ..placements import REPLICATE, Replicate, Shard, local_sizes
from ..runtime import halo
from .core import Comm, Decision, OpView, local_op, on_first_shard, replicate_all


def _shifts_by_dim(op: OpView, ndim: int) -> dict[int, int] | None:
    """``{dim: total shift}`` of a roll, or None for a roll of the flattened tensor."""
    shifts, dims = op.arg(1, "shifts"), op.arg(2, "dims")
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return None
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(shifts) != len(dims) or not all(isinstance(s, int) for s in shifts + dims):
        return None
    out: dict[int, int] = {}
    for s, d in zip(shifts, dims):
        out[d % ndim] = out.get(d % ndim, 0) + s
    return out


@on_first_shard
def roll(op: OpView, x: fx.Node, p: Shard, others: dict) -> Decision | None:
    ndim = len(shape(x))
    by_dim = _shifts_by_dim(op, ndim)
    if by_dim is None:
        return replicate_all(op, "roll of the flattened sharded tensor (no dims)")
    if p.dim not in by_dim:
        return Decision(p, others)
    if len(p.segments) != 1:
        return replicate_all(op, f"roll along a shard of several segments {p}: not one cyclic order of rows")
    shift = by_dim.pop(p.dim)
    sizes = local_sizes(p, op.n)
    plan = halo.roll_plan(sizes, shift)
    moved = max(sum(length for src, _, length in plan[r] if src != r) for r in range(op.n))
    v = value(x)
    row_bytes = v.numel() // max(p.length, 1) * v.element_size()
    # ``others``: the shifts of the unsharded dims as (dim, shift) pairs, rolled locally first.
    exchange = local_op("roll_exchange", dim=p.dim, shift=shift, sizes=tuple(sizes), others=tuple(by_dim.items()))
    return Decision(p, others, local=exchange, comm=Comm(1 if moved else 0, float(moved * row_bytes)))


def roll_exchange_rule(op: OpView) -> Decision | None:
    """``xdit_roll`` met again on another axis: fine unless that axis shards the rolled dim."""
    p = op.pl(op.node.args[0])
    if isinstance(p, Replicate):
        return Decision(REPLICATE)
    if isinstance(p, Shard) and p.dim != op.node.args[1] % len(shape(op.node.args[0])):
        return Decision(p)
    return None


TABLE = [
    (["roll"], roll),
    (["xdit_roll"], roll_exchange_rule),
]
