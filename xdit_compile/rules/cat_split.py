"""Concatenation and splitting along the token dim: segments appear and disappear.

    cat([txt: R[B, T, D], img: S(1)[B, I, D]], dim=1) -> S(1:T+I)   txt is sliced (free)
    split_with_sizes(x: S(1:T+I), [T, I], dim=1)      -> (S(1), S(1))  local sizes (passes/local_ops/cat_split.py)
    chunk(x: S(1), 6, dim=-1)                         -> six S(1)
    cat([x: S(1), pad: R[B, 0, D]], dim=1)            -> S(1)            empty inputs dropped locally (free)
    split(x: S(1:T+I), [0, T, I], dim=1)              -> (R, S(1), S(1)) an empty piece is replicated (free)
    split(x: S(1), [7, 64], dim=1)                    -> (S(1), S(1))    cut inside a shard: x gathered once,
                                                                         each piece re-split evenly
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..graph import shape, value
from ..placements import REPLICATE, Placement, Replicate, Shard
from .core import Decision, LocalOp, OpView, local_op, regroup, split_segments


def _tensors_and_dim(op: OpView) -> tuple[list[Any], int]:
    tensors = op.arg(0, "tensors")
    dim = op.arg(1, "dim", op.node.kwargs.get("axis", 0))  # torch.concatenate(..., axis=1)
    return list(tensors), dim


def cat(op: OpView) -> Decision | None:
    tensors, dim = _tensors_and_dim(op)
    nodes = [t for t in tensors if isinstance(t, fx.Node)]
    if not nodes or len(nodes) != len(tensors):
        return None
    ndim = op.out_ndim
    dim %= ndim
    # Empty tensors contribute nothing: take them out of the local cat (no communication).
    live = [t for t in nodes if len(shape(t)) == ndim and shape(t)[dim] > 0]
    empty = [t for t in nodes if t not in live]
    drop = _drop_empty(op, live, empty)
    pls = [op.pl(t) for t in live]
    if all(isinstance(p, Replicate) for p in pls):
        if drop is not None:
            return Decision(REPLICATE, local=drop)
        return Decision(REPLICATE, {t: REPLICATE for t in empty if not isinstance(op.pl(t), Replicate)})
    shards = [p for p in pls if isinstance(p, Shard)]
    if any(not isinstance(p, (Replicate, Shard)) for p in pls):
        return None
    needs: dict[fx.Node, Placement] = {} if drop is not None else {
        t: REPLICATE for t in empty if not isinstance(op.pl(t), Replicate)}
    if all(p.dim == dim for p in shards):
        # Along the cat dim: segments concatenate; every input must use the same unit size
        # (the first shard's, else single elements) and replicated inputs whole units of it.
        inner = next((u for u in dict.fromkeys((shards[0].inner, 1)) if all(
            (regroup(p, u, op.n) is not None) if isinstance(p, Shard) else shape(t)[dim] % u == 0
            for t, p in zip(live, pls))), None)
        if inner is None:
            return None
        segs: list[int] = []
        for t, p in zip(live, pls):
            if isinstance(p, Shard):
                q = regroup(p, inner, op.n)
                if q is None:
                    return None
                segs.extend(q.segments)  # the same local rows, counted in other units
            else:
                seg = Shard(dim, (shape(t)[dim] // inner,), inner)
                needs[t] = seg
                segs.extend(seg.segments)
        return Decision(Shard(dim, tuple(segs), inner), needs, local=drop)
    # Along another dim: every input must be sharded like the first shard (R inputs sliced),
    # empty ones too (their other dims must match the local pieces).
    target = next(p for p in shards if p.dim != dim)
    for t in ([] if drop is not None else nodes):
        if t not in live and len(shape(t)) == ndim:
            if shape(t)[target.dim] != target.length:
                return None
            needs[t] = target
    for t, p in zip(live, pls):
        if p == target:
            continue
        if shape(t)[target.dim] != target.length:
            return None
        needs[t] = target
    return Decision(target, needs, local=drop)


def _drop_empty(op: OpView, live: list[fx.Node], empty: list[fx.Node]) -> LocalOp | None:
    """The local op taking ``empty`` inputs out of the local cat, or ``None`` when there are none,
    nothing is left, or dropping them would change the result's dtype (cat promotes over all)."""
    if not empty or not live:
        return None
    out = op.out_value
    if any(value(t).dtype != out.dtype for t in live):
        return None
    tensors = _tensors_and_dim(op)[0]
    # By position: the lowering may have put a sliced copy of an input in its place.
    return local_op("cat_drop_empty", positions=tuple(i for i, t in enumerate(tensors) if t in empty))


def stack(op: OpView) -> Decision | None:
    tensors, dim = _tensors_and_dim(op)
    nodes = [t for t in tensors if isinstance(t, fx.Node)]
    if len(nodes) != len(tensors):
        return None
    pls = [op.pl(t) for t in nodes]
    if all(isinstance(p, Replicate) for p in pls):
        return Decision(REPLICATE)
    shards = [p for p in pls if isinstance(p, Shard)]
    if len(shards) != len([p for p in pls if not isinstance(p, Replicate)]):
        return None
    target = shards[0]
    needs = {t: target for t, p in zip(nodes, pls) if p != target}
    dim %= op.out_ndim
    return Decision(target.with_dim(target.dim + (1 if dim <= target.dim else 0)), needs)


def pad_sequence(op: OpView) -> Decision | None:
    """``pad_sequence`` of equal-length sequences is a ``stack``: no padding is written.

    With unequal lengths the padding lands at the global end of each row, which a shard of
    the sequence dim cannot reproduce locally: no rule (gathered) unless the sequence dim is whole.
    """
    seqs = list(op.arg(0, "sequences"))
    nodes = [t for t in seqs if isinstance(t, fx.Node)]
    if not nodes or len(nodes) != len(seqs):
        return None
    pls = [op.pl(t) for t in nodes]
    if all(isinstance(p, Replicate) for p in pls):
        return Decision(REPLICATE)
    batch_first = bool(op.arg(1, "batch_first", False))
    equal = len({shape(t)[0] for t in nodes}) == 1
    shards = [p for p in pls if isinstance(p, Shard)]
    if len(shards) != len([p for p in pls if not isinstance(p, Replicate)]):
        return None
    target = shards[0]
    if target.dim == 0 and not equal:
        return None
    if any(shape(t)[target.dim] != target.length for t in nodes):
        return None
    needs = {t: target for t, p in zip(nodes, pls) if p != target}
    if target.dim == 0:
        return Decision(target.with_dim(1 if batch_first else 0), needs)
    return Decision(target.with_dim(target.dim + 1), needs)


def _split_bounds(op: OpView, length: int) -> list[int] | None:
    """Global offsets of the pieces' edges along the split dim (``None``: not known)."""
    name = op.name
    if name == "unbind":
        return None
    if name == "tensor_split":
        spec = op.arg(1, "indices_or_sections", op.node.kwargs.get("sections", op.node.kwargs.get("indices")))
        if isinstance(spec, int):
            base, extra = divmod(length, spec)
            sizes = [base + (1 if i < extra else 0) for i in range(spec)]
        elif isinstance(spec, (list, tuple)) and all(isinstance(i, int) for i in spec):
            edges = [0, *[min(max(i + length if i < 0 else i, 0), length) for i in spec], length]
            # Decreasing indices make overlapping pieces (x[a:b] empty, then x[b:]): no rule.
            return edges if all(a <= b for a, b in zip(edges[:-1], edges[1:])) else None
        else:
            return None
    elif name == "chunk":
        chunks = op.arg(1, "chunks")
        size = -(-length // chunks)
        sizes = [min(size, length - i) for i in range(0, length, size)]
    else:
        spec = op.arg(1, "split_size_or_sections", op.node.kwargs.get("split_sizes", op.node.kwargs.get("split_size")))
        if isinstance(spec, int):
            sizes = [min(spec, length - i) for i in range(0, length, spec)]
        elif isinstance(spec, (list, tuple)) and all(isinstance(s, int) for s in spec):
            sizes = list(spec)
        else:
            return None
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return bounds


def _split_dim(op: OpView) -> int:
    if op.name == "unbind":
        return op.arg(1, "dim", 0)
    return op.arg(2, "dim", 0)


def _pieces(p: Shard, bounds: list[int]) -> list[Placement] | None:
    """Placements of the pieces between ``bounds`` when each is made of whole segments of ``p``
    (an empty piece is replicated: it has no rows to hold)."""
    edges = sorted(set(bounds))
    parts = split_segments(p, edges) if len(edges) > 1 else []
    if parts is None:
        return None
    by_start = dict(zip(edges[:-1], parts))
    return [by_start[lo] if hi > lo else REPLICATE for lo, hi in zip(bounds[:-1], bounds[1:])]


def split(op: OpView) -> Decision | None:
    """``split`` / ``split_with_sizes`` / ``tensor_split`` / ``chunk`` / ``unbind``.

        x: S(1:T+I), split [T, I] on dim 1     -> (S(1), S(1))          local split sizes
        x: S(1:T+I), split [0, T, I, 0]        -> (R, S(1), S(1), R)    empty pieces
        x: S(1),     split [7, 64] (cut in a shard) -> x gathered, (S(1), S(1)) fresh even shards
    """
    src = op.node.args[0]
    p = op.pl(src)
    outs = op.out_value
    count = len(outs)
    if isinstance(p, Replicate):
        return Decision(tuple(REPLICATE for _ in range(count)))
    if not isinstance(p, Shard):
        return None
    ndim = len(shape(src))
    dim = _split_dim(op) % ndim
    if dim != p.dim:
        if op.name == "unbind":
            q = p.with_dim(p.dim - (1 if dim < p.dim else 0))
            return Decision(tuple(q for _ in range(count)))
        return Decision(tuple(p for _ in range(count)))
    bounds = _split_bounds(op, shape(src)[dim])
    if bounds is None or len(bounds) - 1 != count:
        return None
    if all(hi == lo for lo, hi in zip(bounds[:-1], bounds[1:])):
        return Decision(tuple(REPLICATE for _ in range(count)), {src: REPLICATE})
    parts = _pieces(p, bounds)
    if parts is not None:
        return Decision(tuple(parts), local=local_op("split_local"))
    # A cut inside a shard: gather the source once and re-split every piece evenly. The seed
    # search tries seeds whose segments fall on such cuts (then this is not met).
    fresh = tuple(Shard(dim, (hi - lo,), 1) if hi > lo else REPLICATE for lo, hi in zip(bounds[:-1], bounds[1:]))
    return Decision(fresh, {src: REPLICATE}, local=local_op("split_regathered", bounds=tuple(bounds)))


def cut_offsets(node: fx.Node, name: str, src: fx.Node) -> list[int]:
    """Global offsets along ``src``'s split dim where split-like op ``node`` cuts it (for the
    seed search, which prefers seeds whose segments end there); empty when unknown."""
    if name not in ("split", "split_with_sizes", "tensor_split", "chunk") or not node.args or node.args[0] is not src:
        return []
    view = OpView(node, {}, 1, name)
    bounds = _split_bounds(view, shape(src)[_split_dim(view) % len(shape(src))])
    return [] if bounds is None else sorted(set(bounds[1:-1]) - {0, shape(src)[_split_dim(view) % len(shape(src))]})


TABLE = [
    (["cat", "concat", "concatenate"], cat),
    (["stack"], stack),
    (["pad_sequence"], pad_sequence),
    (["split", "split_with_sizes", "tensor_split", "chunk", "unbind"], split),
]
