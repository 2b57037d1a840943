"""``interpolate_local_size``: an explicit output size becomes this rank's local output size.

    interpolate(x: S(2), size=(2H, 2W))  ->  interpolate(x, size=(2h_r, 2W))
"""

from __future__ import annotations

import torch.fx as fx

from ...graph import shape
from ...placements import local_shape
from ...rules.core import LocalOp
from .base import LocalContext


def interpolate_local_size(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    index, name = (1, "output_size") if "output_size" in node.kwargs else (1, "size")
    local = local_shape(shape(node), ctx.placement(node), ctx.size, ctx.rank)[2:]
    size = tuple(int(s) for s in local)
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: size}
    else:
        args = list(node.args)
        args[index] = size
        node.args = tuple(args)


TABLE = [
    ("interpolate_local_size", interpolate_local_size),
]
