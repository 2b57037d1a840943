"""Local ops of ``cat`` and the split family (``rules/cat_split.py``).

    cat_drop_empty(positions)   cat([x, pad0], 1)         ->  cat([x], 1)       (empty inputs dropped)
    split_local                 split(x: S(1:T+I), [T, I]) ->  x.split([t_r, i_r], dim=1)   local sizes
    split_regathered(bounds)    split(x: R (gathered), [7, 64]) ->  shard_slice(x, ..).split(..)
"""

from __future__ import annotations

import torch.fx as fx

from ...placements import Shard, chunk_bounds, local_length
from ...rules.core import LocalOp
from ...runtime import redistribute as rt
from .base import LocalContext


def cat_drop_empty(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    # Their local shapes need not match the local pieces (an empty tensor sharded on another
    # dim); without them the local cat is the same values. By position: the lowering may have
    # put a sliced copy of an input in its place.
    positions = op["positions"]
    if node.args and isinstance(node.args[0], (list, tuple)):
        kept = [t for i, t in enumerate(node.args[0]) if i not in positions]
        node.args = (kept, *node.args[1:])
    else:
        kept = [t for i, t in enumerate(node.kwargs["tensors"]) if i not in positions]
        node.kwargs = {**node.kwargs, "tensors": kept}


def split_local(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    # Each output is sharded on the split dim (empty pieces replicated, of length 0 everywhere):
    # split the local tensor by local sizes.
    src = node.args[0]
    pls = ctx.placement(node)
    dim = next(p.dim for p in pls if isinstance(p, Shard))
    sizes = [local_length(p, ctx.size, ctx.rank) if isinstance(p, Shard) else 0 for p in pls]
    node.op, node.target = "call_method", "split"
    node.args, node.kwargs = (src, sizes), {"dim": dim}


def split_regathered(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    # The source arrives whole: take this rank's chunk of every piece, then split by their lengths.
    bounds = op["bounds"]
    src, pls = node.args[0], ctx.placement(node)
    dim = next(p.dim for p in pls if isinstance(p, Shard))
    ranges, sizes = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        a, b = chunk_bounds(hi - lo, ctx.size, ctx.rank) if hi > lo else (0, 0)
        if b > a:
            ranges.append((lo + a, b - a))
        sizes.append(b - a)
    with graph.inserting_before(node):
        local = graph.call_function(rt.shard_slice, (src, dim, tuple(ranges) or ((0, 0),)))
    node.op, node.target = "call_method", "split"
    node.args, node.kwargs = (local, sizes), {"dim": dim}


TABLE = [
    ("cat_drop_empty", cat_drop_empty),
    ("split_local", split_local),
    ("split_regathered", split_regathered),
]
