"""Indexing: basic slicing keeps a shard when a sharded dim is taken whole or cut on segments.

    x: S(1)[B, S, D]     x[:, None]          -> S(2)
    x: S(1:T+I)          x[:, :T]            -> S(1)   local op getitem_local: this rank's slice
    x: S(1)              x[:, 0]             -> needs R (one token lives on one rank)
    (a, b): (S(1), R)    tuple[0]            -> S(1)
    q: S(2)              q[..., :d].copy_(r: S(2)), q.narrow(-1, 0, d).fill_(0)   -> local writes
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F

from ..graph import is_tensor, shape
from ..placements import REPLICATE, Replicate, Shard
from .core import Decision, OpView, on_first_shard, align_to, local_op, replicate_all, split_segments


def _walk(index: tuple, ndim: int):
    """Yield (position, element, in_dim or None, out_dim or None) for a basic index tuple."""
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    in_dim = out_dim = 0
    for pos, e in enumerate(index):
        if e is Ellipsis:
            for _ in range(ndim - consumed):
                yield pos, slice(None), in_dim, out_dim
                in_dim += 1
                out_dim += 1
        elif e is None:
            yield pos, e, None, out_dim
            out_dim += 1
        elif isinstance(e, int):
            yield pos, e, in_dim, None
            in_dim += 1
        else:
            yield pos, e, in_dim, out_dim
            in_dim += 1
            out_dim += 1
    while in_dim < ndim:
        yield len(index), slice(None), in_dim, out_dim
        in_dim += 1
        out_dim += 1


def _basic(index: Any) -> tuple | None:
    index = index if isinstance(index, tuple) else (index,)
    for e in index:
        if isinstance(e, slice):
            if any(isinstance(v, fx.Node) for v in (e.start, e.stop, e.step)):
                return None
        elif isinstance(e, bool) or not (e is None or e is Ellipsis or isinstance(e, int)):
            return None  # x[True] adds a dim like None: treated as advanced indexing
    return index


def _slice_bounds(e: slice, length: int) -> tuple[int, int] | None:
    start, stop, step = e.indices(length)
    if step != 1:
        return None
    return start, max(start, stop)


def index_view(p: Shard, index: Any, ndim: int) -> tuple[Shard | None, bool, str | None]:
    """Placement of ``x[index]`` for ``x`` sharded as ``p``: (placement, local rewrite needed, why not).

    Basic indexing only. The sharded dim must be kept whole, or cut by a step-1 slice on
    segment boundaries (then the local slice differs from the global one: rewrite).
    """
    index = _basic(index)
    if index is None:
        return None, False, "advanced indexing on a sharded tensor"
    for pos, e, in_dim, out_dim in _walk(index, ndim):
        if in_dim != p.dim:
            continue
        if out_dim is None:
            return None, False, "integer index into the sharded dim"
        bounds = _slice_bounds(e, p.length)
        if bounds is None:
            return None, False, "strided slice of the sharded dim"
        if bounds == (0, p.length):
            return p.with_dim(out_dim), False, None
        parts = split_segments(p, list(bounds))
        if parts is None:
            return None, False, "slice of the sharded dim does not fall on segment boundaries"
        return parts[0].with_dim(out_dim), True, None
    return None, False, "index does not reach the sharded dim"


def _view_ndim(index: Any, ndim: int) -> int:
    return sum(1 for _, _, _, out_dim in _walk(index if isinstance(index, tuple) else (index,), ndim)
               if out_dim is not None)


def getitem(op: OpView) -> Decision | None:
    src, index = op.node.args[0], op.node.args[1]
    p = op.pl(src)
    if isinstance(p, tuple):  # picking from a multi-output op
        if isinstance(index, (int, slice)):
            return Decision(p[index])
        return replicate_all(op, "non-constant index into a tuple of tensors")
    if isinstance(p, Replicate):
        idx_nodes = [x for x in op.tensor_inputs() if x is not src]
        return Decision(REPLICATE, {x: REPLICATE for x in idx_nodes if not isinstance(op.pl(x), Replicate)})
    if not isinstance(p, Shard):
        return None
    q, rewrite, why = index_view(p, index, len(shape(src)))
    if q is None:
        return regathered_slice(op, src, p, index) or replicate_all(op, why)
    return Decision(q, local=local_op("getitem_local") if rewrite else None)


def regathered_slice(op: OpView, src: fx.Node, p: Shard, index: Any) -> Decision | None:
    """A step-1 slice of the sharded dim that cuts inside a shard, or an empty one.

        x: S(1)[B, 71, D]   x[:, :7]    -> x gathered once (shared by every such slice of x), S(1) of 7
        x: S(1)[B, 71, D]   x[:, 71:]   -> R (empty: nothing to hold, nothing moved)

    The rest of the graph stays sharded; the seed search prefers seeds whose segments end at
    such cuts (then the slice is local and this is not met).
    """
    index = _basic(index)
    if index is None:
        return None
    for pos, e, in_dim, out_dim in _walk(index, len(shape(src))):
        if in_dim != p.dim:
            continue
        if out_dim is None or not isinstance(e, slice):
            return None
        bounds = _slice_bounds(e, p.length)
        if bounds is None:
            return None
        lo, hi = bounds
        if hi == lo:
            return Decision(REPLICATE, local=local_op("slice_chunk", pos=pos, lo=0, hi=0, whole=False))
        return Decision(Shard(out_dim, (hi - lo,), 1), {src: REPLICATE},
                        local=local_op("slice_chunk", pos=pos, lo=lo, hi=hi, whole=True))
    return None


def setitem(op: OpView) -> Decision | None:
    """``dst[index] = val`` writes in place: a shard may only be written where this rank holds it.

        out: S(1), out[..., 0::2] = v: S(1)      -> local write (the sharded dim is kept whole)
        q: S(2:T+I), q[:, :, T:] = r: S(2)       -> local write into this rank's image rows
        q: S(1), q[:, :3] = 0                    -> no rule: the whole graph runs replicated
    """
    dst, index, val = op.node.args[0], op.node.args[1], op.node.args[2]
    p = op.pl(dst)
    idx_nodes = [x for x in op.tensor_inputs() if x is not dst and x is not val]
    needs = {x: REPLICATE for x in idx_nodes if not isinstance(op.pl(x), Replicate)}
    if isinstance(p, Replicate):
        if isinstance(val, fx.Node) and not isinstance(op.pl(val), Replicate):
            needs[val] = REPLICATE
        return Decision(None, needs)
    if not isinstance(p, Shard) or idx_nodes:
        return None
    q, rewrite, why = index_view(p, index, len(shape(dst)))
    if q is None:
        return None
    if isinstance(val, fx.Node) and is_tensor(val):
        aligned = align_to(op, [val], q, _view_ndim(index, len(shape(dst))))
        if aligned is None:
            return None
        needs.update(aligned)
    elif isinstance(val, fx.Node):
        return None
    return Decision(None, needs, local=local_op("setitem_local") if rewrite else None)


@on_first_shard
def narrow(op: OpView, src: fx.Node, p: Shard, others: dict) -> Decision | None:
    if len(op.node.args) < 4:
        return None
    dim, start, length = op.node.args[1] % len(shape(src)), op.node.args[2], op.node.args[3]
    if dim != p.dim:
        return Decision(p)
    if not isinstance(start, int) or not isinstance(length, int):
        return None
    parts = split_segments(p, [start, start + length])
    if parts is None:
        return regathered_narrow(op, src, dim, start, length)
    return Decision(parts[0], local=local_op("narrow_local"))


def regathered_narrow(op: OpView, src: fx.Node, dim: int, start: int, length: int) -> Decision:
    """``narrow`` cutting inside a shard: as :func:`regathered_slice` (gathered once, then an even
    shard of the piece; an empty piece is replicated for free)."""
    start = start + shape(src)[dim] if start < 0 else start
    if length == 0:
        return Decision(REPLICATE, local=local_op("narrow_chunk", start=0, length=0, whole=False))
    return Decision(Shard(dim, (length,), 1), {src: REPLICATE},
                    local=local_op("narrow_chunk", start=start, length=length, whole=True))


@on_first_shard
def along_other_dim(op: OpView, src: fx.Node, p: Shard, others: dict) -> Decision | None:
    """index_select / select / repeat_interleave / flip: fine off the sharded dim (roll: rules/roll.py)."""
    ndim = len(shape(src))
    if op.name == "repeat_interleave":
        dim = op.arg(2, "dim")
    elif op.name == "flip":
        if "dims" not in op.node.kwargs and len(op.node.args) > 2:
            dims = list(op.node.args[1:])  # x.flip(2, 1): the dims as separate arguments
        else:
            dims = op.arg(1, "dims")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if dims == [] or any(d % ndim == p.dim for d in dims):
            return replicate_all(op, f"{op.name} along the sharded dim")
        return Decision(p, others)
    else:
        dim = op.arg(1, "dim")
    if dim is None:
        return replicate_all(op, f"{op.name} over a flattened sharded tensor")
    dim %= ndim
    if dim == p.dim:
        return replicate_all(op, f"{op.name} along the sharded dim")
    if op.name == "select":
        return Decision(p.with_dim(p.dim - (1 if dim < p.dim else 0)), others)
    return Decision(p, others)


def embedding(op: OpView) -> Decision | None:
    """``F.embedding(indices, weight)``, or ``torch.embedding(weight, indices)``: the output
    is sharded like the indices (the table stays whole)."""
    if op.node.op == "call_function" and op.node.target is F.embedding:
        idx = op.arg(0, "input")
    else:
        idx = op.arg(1, "indices")
    p = op.pl(idx)
    params = {x: REPLICATE for x in op.tensor_inputs() if x is not idx and not isinstance(op.pl(x), Replicate)}
    if isinstance(p, (Replicate, Shard)):
        return Decision(p, params)
    return None


@on_first_shard
def pad(op: OpView, src: fx.Node, p: Shard, others: dict) -> Decision | None:
    widths = op.arg(1, "pad")
    ndim = len(shape(src))
    touched = {ndim - 1 - i // 2 for i, w in enumerate(widths) if w}
    if p.dim in touched:
        return replicate_all(op, "padding the sharded dim")
    return Decision(p)


def copy_(op: OpView) -> Decision | None:
    """``dst.copy_(src)`` (method or ``torch.Tensor.copy_``) writes ``dst`` in place.

        dst: S(2) view of q, src: S(2)       -> local write (each rank copies its own tokens)
        dst: S(2), src: R[.., 1, d]          -> src sliced (free) or broadcast, local write
        dst: R, src: S(1)                    -> src gathered, replicated write
        dst: P                               -> no rule: refused (the write cannot stay a sum)
    """
    dst, src = op.arg(0, "self"), op.arg(1, "src")
    p = op.pl(dst)
    if not isinstance(src, fx.Node) or not is_tensor(src):
        return None
    if isinstance(p, Replicate):
        return Decision(REPLICATE, {} if isinstance(op.pl(src), Replicate) else {src: REPLICATE})
    if not isinstance(p, Shard):
        return None
    needs = align_to(op, [src], p, len(shape(dst)))
    return None if needs is None else Decision(p, needs)


@on_first_shard
def fill_(op: OpView, dst: fx.Node, p: Shard, others: dict) -> Decision | None:
    """``x.fill_(v)`` / ``x.zero_()``: every element gets the same value, each rank fills its own shard."""
    return Decision(p, others)


TABLE = [
    (["getitem"], getitem),
    (["setitem"], setitem),
    (["narrow"], narrow),
    (["index_select", "select", "repeat_interleave", "flip"], along_other_dim),
    (["embedding"], embedding),
    (["pad"], pad),
    (["copy_"], copy_),
    (["fill_", "zero_"], fill_),
]
