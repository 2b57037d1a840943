"""Concatenation and splitting along the token dim: segments appear and disappear.

    cat([txt: R[B, T, D], img: S(1)[B, I, D]], dim=1) -> S(1:T+I)   txt is sliced (free)
    split_with_sizes(x: S(1:T+I), [T, I], dim=1)      -> (S(1), S(1))  local sizes rewritten
    chunk(x: S(1), 6, dim=-1)                         -> six S(1)
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..graph import shape
from ..placements import REPLICATE, Placement, Replicate, Shard, local_length
from .core import Decision, OpView, regroup, split_segments


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
    # Empty tensors (numel 0) contribute nothing: keep them replicated.
    live = [t for t in nodes if len(shape(t)) == ndim and shape(t)[dim] > 0]
    pls = [op.pl(t) for t in live]
    if all(isinstance(p, Replicate) for p in pls):
        return Decision(REPLICATE, {t: REPLICATE for t in nodes if t not in live and not isinstance(op.pl(t), Replicate)})
    shards = [p for p in pls if isinstance(p, Shard)]
    if any(not isinstance(p, (Replicate, Shard)) for p in pls):
        return None
    needs: dict[fx.Node, Placement] = {t: REPLICATE for t in nodes if t not in live and not isinstance(op.pl(t), Replicate)}
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
        return Decision(Shard(dim, tuple(segs), inner), needs)
    # Along another dim: every input must be sharded like the first shard (R inputs sliced),
    # empty ones too (their other dims must match the local pieces).
    target = next(p for p in shards if p.dim != dim)
    for t in nodes:
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
    return Decision(target, needs)


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
    name = op.name
    if name == "unbind":
        return None
    if name == "chunk":
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


def _local_split(graph: fx.Graph, node: fx.Node, ctx: Any) -> None:
    # Each output is sharded on the split dim: split the local tensor by local sizes.
    src = node.args[0]
    sizes = [local_length(p, ctx.n, ctx.rank) for p in ctx.pl(node)]
    node.op, node.target = "call_method", "split"
    node.args, node.kwargs = (src, sizes), {"dim": ctx.pl(node)[0].dim}


def split(op: OpView) -> Decision | None:
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
    if bounds is None:
        return None
    parts = split_segments(p, bounds)
    if parts is None:
        return None
    return Decision(tuple(parts), rewrite=_local_split)


TABLE = [
    (["cat", "concat", "concatenate"], cat),
    (["stack"], stack),
    (["pad_sequence"], pad_sequence),
    (["split", "split_with_sizes", "chunk", "unbind"], split),
]
