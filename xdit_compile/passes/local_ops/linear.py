"""``bias_on_rank0``: a row-parallel linear (weight split on its in-features) adds its bias once.

    linear(x, W, b)  ->  linear(x, W, b)        on rank 0
                     ->  linear(x, W, b * 0)    on the other ranks

Each rank's output is a partial sum that one all-reduce completes, so the bias must be counted
once. Times zero rather than dropped: a collective that made the bias whole must stay in every
rank's program (dropped on some ranks only, the ranks' collectives would no longer pair up).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...rules.core import LocalOp
from .base import LocalContext


def bias_on_rank0(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    if ctx.rank == 0:
        return
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(b, fx.Node):
        return
    with graph.inserting_before(node):
        zero = graph.call_function(torch.mul, (b, 0))
    zero.meta.update({k: v for k, v in b.meta.items() if k in ("val", "example_value")})
    if len(node.args) > 2:
        node.args = (*node.args[:2], zero, *node.args[3:])
    else:
        node.kwargs = {**node.kwargs, "bias": zero}


TABLE = [
    ("bias_on_rank0", bias_on_rank0),
]
