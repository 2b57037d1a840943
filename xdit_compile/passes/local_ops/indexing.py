"""Local ops of indexing (``rules/indexing.py``): global offsets into the sharded dim become this
rank's local ones.

    getitem_local / setitem_local   x[:, 6:14] on S(1:6+8)   ->  x[:, a:b], this rank's rows of 6:14
    slice_chunk(pos, lo, hi, whole) x[:, :7] on x gathered   ->  x[:, lo+a:lo+b], this rank's chunk
    narrow_local                    x.narrow(1, 6, 8)        ->  x.narrow(1, a, b - a)
    narrow_chunk(start, length, whole)  as slice_chunk, for narrow
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ...graph import shape
from ...placements import chunk_bounds
from ...rules.core import LocalOp, local_range
from ...rules.indexing import _slice_bounds, _walk
from .base import LocalContext


def _local_index(index: Any, src: fx.Node, ctx: LocalContext) -> tuple:
    """``index`` with the slice of the sharded dim replaced by this rank's local range."""
    index = index if isinstance(index, tuple) else (index,)
    p = ctx.placement(src)
    new = list(index)
    for pos, e, in_dim, _ in _walk(index, len(shape(src))):
        if in_dim == p.dim:
            lo, hi = _slice_bounds(e, p.length)
            a, b = local_range(p, ctx.size, ctx.rank, lo, hi)
            if pos >= len(new):
                new.extend([slice(None)] * (pos - len(new) + 1))
            new[pos] = slice(a, b)
    return tuple(new)


def getitem_local(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    src, index = node.args
    node.args = (src, _local_index(index, src, ctx))


def setitem_local(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    dst, index, val = node.args
    node.args = (dst, _local_index(index, dst, ctx), val)


def slice_chunk(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    # ``whole``: the source arrives gathered; take this rank's chunk of [lo, hi). Else an empty slice.
    pos, lo, hi, whole = op["pos"], op["lo"], op["hi"], op["whole"]
    src, index = node.args
    new = list(index if isinstance(index, tuple) else (index,))
    if pos >= len(new):
        new.extend([slice(None)] * (pos - len(new) + 1))
    if whole:
        a, b = chunk_bounds(hi - lo, ctx.size, ctx.rank)
        new[pos] = slice(lo + a, lo + b)
    else:
        new[pos] = slice(0, 0)
    node.args = (src, tuple(new))


def narrow_local(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    src, dim, start, length = node.args[0], node.args[1], node.args[2], node.args[3]
    p = ctx.placement(src)
    a, b = local_range(p, ctx.size, ctx.rank, start, start + length)
    node.args = (src, dim, a, b - a)


def narrow_chunk(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    start, length, whole = op["start"], op["length"], op["whole"]
    a, b = chunk_bounds(length, ctx.size, ctx.rank) if whole else (0, 0)
    node.args = (node.args[0], node.args[1], start + a, b - a)


TABLE = [
    ("getitem_local", getitem_local),
    ("setitem_local", setitem_local),
    ("slice_chunk", slice_chunk),
    ("narrow_local", narrow_local),
    ("narrow_chunk", narrow_chunk),
]
