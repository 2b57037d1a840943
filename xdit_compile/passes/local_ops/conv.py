"""``conv_halo``: a convolution over a spatial shard, with halo rows from the neighbours.

    conv2d(x, w, b, s, p)  ->  conv2d(halo.halo_exchange(x, dim, before, after, group), w, b, s, padding)

``padding`` is the original one with 0 on the sharded dim (the halo, or zeros at the global
edges, takes its place). See ``rules/conv.py`` for the halo depths.
"""

from __future__ import annotations

import torch.fx as fx

from ...graph import value
from ...rules.core import LocalOp
from ...runtime import halo
from .base import LocalContext


def conv_halo(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    dim, before, after, padding = op["dim"], op["before"], op["after"], op["padding"]
    x = node.args[0]
    if before or after:
        with graph.inserting_before(node):
            x = graph.call_function(halo.halo_exchange, (x, dim, before, after, ctx.group))
        v = value(node.args[0])
        ctx.record_collective("halo exchange", node, v.numel() // v.shape[dim] * (before + after) * v.element_size())
    args = list(node.args)
    args[0] = x
    if "padding" in node.kwargs:
        node.kwargs = {**node.kwargs, "padding": padding}
    else:
        while len(args) < 5:  # conv*(input, weight, bias=None, stride=1, padding=0)
            args.append({3: 1, 4: 0}.get(len(args), None))
        args[4] = padding
    node.args = tuple(args)


TABLE = [
    ("conv_halo", conv_halo),
]
