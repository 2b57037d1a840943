"""``mean_as_sum``: a mean over the sharded dim as this rank's share of a ``Partial`` sum.

    mean(x, dims, keepdim)  ->  div(sum(x, dims, keepdim), global_count)

Summed over the ranks (where a replicated value is needed) this is the global mean.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...graph import shape
from ...rules.core import LocalOp
from .base import LocalContext


def _reduced_dims_of(node: fx.Node, ndim: int) -> list[int]:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim is None:
        return list(range(ndim))
    return [dim % ndim] if isinstance(dim, int) else [d % ndim for d in dim]


def _keepdim_of(node: fx.Node) -> bool:
    return bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))


def mean_as_sum(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    src = node.args[0]
    dims = _reduced_dims_of(node, len(shape(src)))
    count = 1
    for d in dims:
        count *= shape(src)[d]  # global shape: meta holds global example values
    kwargs = dict(node.kwargs)
    with graph.inserting_before(node):
        summed = graph.call_method("sum", (src, tuple(dims)), {"keepdim": _keepdim_of(node), **(
            {"dtype": kwargs["dtype"]} if "dtype" in kwargs else {})})
    node.op, node.target = "call_function", torch.div
    node.args, node.kwargs = (summed, count), {}


TABLE = [
    ("mean_as_sum", mean_as_sum),
]
