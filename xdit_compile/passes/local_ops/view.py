"""Local ops of reshapes and expands (``rules/view.py``): the global target shape becomes this
rank's local one.

    reshape_local   view(x: S(1)[B, S, D], B, S, H, Dh)  ->  x.reshape(B, s_r, H, Dh)
    expand_local    expand(x: S(1), B, S, D)              ->  x.expand(B, s_r, D)
"""

from __future__ import annotations

import torch.fx as fx

from ...graph import shape
from ...placements import local_shape
from ...rules.core import LocalOp
from .base import LocalContext


def reshape_local(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    src = node.args[0]
    node.op, node.target = "call_method", "reshape"
    node.args = (src, tuple(int(s) for s in local_shape(shape(node), ctx.placement(node), ctx.size, ctx.rank)))
    node.kwargs = {}


def expand_local(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    src = node.args[0]
    node.op, node.target = "call_method", "expand"
    node.args = (src, tuple(int(s) for s in local_shape(shape(node), ctx.placement(node), ctx.size, ctx.rank)))
    node.kwargs = {}


TABLE = [
    ("reshape_local", reshape_local),
    ("expand_local", expand_local),
]
