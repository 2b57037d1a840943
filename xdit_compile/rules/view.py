"""Reshapes, permutes and expands: a shard moves with its dimension.

Every reshape-like op (view, reshape, flatten, unflatten, squeeze, unsqueeze, view_as) is
handled by one rule that groups input and output dims with equal products:

    [B, S, D]  --view-->  [B, S, H, Dh]      S(1) -> S(1)            (D -> H x Dh untouched)
    [B, D, h, w] --flatten(2)--> [B, D, h*w]   S(2) -> S(2:h x w)     (rows of tokens)
    [B, S, D] --view--> [B*S, D]              S(1) -> S(0:S+S)        (one segment per batch)
    [B*S, D] --view--> [B, S, D]              S(0:S+S) -> S(1)

The local op ``reshape_local`` (``passes/local_ops/view.py``) replaces the op by ``reshape`` to
this rank's local shape.
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..graph import shape
from ..placements import REPLICATE, Replicate, Shard
from .core import Decision, OpView, local_op, on_first_shard, regroup

RESHAPES = ["view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
            "_unsafe_view"]
PERMUTES = ["permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"]
EXPANDS = ["expand", "expand_as", "broadcast_to"]


def dim_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of ``a`` and ``b`` with equal products (size-1 dims stand alone)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            raise ValueError(f"shapes {a} and {b} have different numbers of elements")
        gi, gj, pi, pj = [i], [j], a[i], b[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= a[i]
            else:
                j += 1
                gj.append(j)
                pj *= b[j]
        groups.append((gi, gj))
        i += 1
        j += 1
    return groups


def reshape_placement(p: Shard, a: tuple[int, ...], b: tuple[int, ...], n: int) -> Shard | None:
    """Where shard ``p`` of a tensor of shape ``a`` lands after reshaping to ``b``, if it can."""
    for gi, gj in dim_groups(a, b):
        if p.dim not in gi:
            continue
        outer = math.prod(a[gi[0]:p.dim])
        inner = p.inner * math.prod(a[p.dim + 1:gi[-1] + 1])
        segs = p.segments * outer
        for k in gj:
            outer_k = math.prod(b[gj[0]:k])
            inner_dims = math.prod(b[k + 1:gj[-1] + 1])
            if len(segs) % outer_k:
                continue
            base = segs[: len(segs) // outer_k]
            if base * outer_k != segs:
                continue
            cand = Shard(k, base, inner)
            if inner % inner_dims == 0:
                cand = Shard(k, base, inner // inner_dims)
            else:
                step = inner_dims // math.gcd(inner, inner_dims)
                cand = regroup(Shard(k, base, inner), inner * step, n)
                if cand is None:
                    continue
                cand = Shard(k, cand.segments, cand.inner // inner_dims)
            if cand.length == b[k]:
                return cand
        return None
    return None


def reshape_rule(op: OpView) -> Decision | None:
    src = op.node.args[0]
    p = op.pl(src)
    if isinstance(p, Replicate):
        other = op.node.args[1] if op.name in ("view_as", "reshape_as") and len(op.node.args) > 1 else None
        if isinstance(other, fx.Node) and not isinstance(op.pl(other), Replicate):
            # view_as(other) would read the local shape of a sharded other: spell the shape out.
            return Decision(REPLICATE, local=local_op("reshape_local"))
        return Decision(REPLICATE)
    if not isinstance(p, Shard):
        return None
    out = reshape_placement(p, shape(src), tuple(op.out_value.shape), op.n)
    if out is None:
        return None
    return Decision(out, local=local_op("reshape_local"))


def _permutation(op: OpView) -> list[int]:
    ndim = op.out_ndim
    node = op.node
    args = node.args[1:]
    if op.name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = node.kwargs.get("dims", dims)
        return [d % ndim for d in dims]
    if op.name == "t":
        return [1, 0] if ndim == 2 else list(range(ndim))
    if op.name in ("movedim", "moveaxis"):
        src, dst = op.arg(1, "source"), op.arg(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [s % ndim for s in src], [d % ndim for d in dst]
        order = [d for d in range(ndim) if d not in src]
        perm = [0] * ndim
        for s, d in sorted(zip(src, dst), key=lambda x: x[1]):
            order.insert(d, s)
        perm = order
        return perm
    d0 = op.arg(1, "dim0") % ndim
    d1 = op.arg(2, "dim1") % ndim
    perm = list(range(ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


@on_first_shard
def permute_rule(op: OpView, src: fx.Node, p: Shard, others: dict) -> Decision | None:
    return Decision(p.with_dim(_permutation(op).index(p.dim)))


@on_first_shard
def expand_rule(op: OpView, src: fx.Node, p: Shard, needs: dict) -> Decision | None:
    out = p.with_dim(p.dim + op.out_ndim - len(shape(src)))
    if op.out_value.shape[out.dim] != p.length:  # a size-1 sharded dim broadcast to many
        return None
    return Decision(out, needs, local=local_op("expand_local"))


@on_first_shard
def repeat_rule(op: OpView, src: fx.Node, p: Shard, others: dict) -> Decision | None:
    sizes = list(op.node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    if "dims" in op.node.kwargs or "repeats" in op.node.kwargs:
        sizes = list(op.node.kwargs.get("dims", op.node.kwargs.get("repeats")))
    # tile pads missing leading repeats with 1 (repeat refuses fewer sizes than dims).
    sizes = [1] * (len(shape(src)) - len(sizes)) + sizes
    d = p.dim + len(sizes) - len(shape(src))
    if sizes[d] != 1:
        return None
    return Decision(p.with_dim(d))


TABLE = [
    (RESHAPES, reshape_rule),
    (PERMUTES, permute_rule),
    (EXPANDS, expand_rule),
    (["repeat", "tile"], repeat_rule),
]
