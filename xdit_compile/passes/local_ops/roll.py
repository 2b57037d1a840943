"""``roll_exchange``: a roll of the sharded dim as a neighbour exchange of rows.

    roll(x, (a, s), (d, dim))  ->  halo.roll_exchange(roll(x, a, d), dim, s, sizes, group)

``others`` (the unsharded dims' (dim, shift) pairs) roll locally first; a shift by a whole
turn is a copy. See ``rules/roll.py`` for when the rule chooses it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...graph import value
from ...rules.core import LocalOp
from ...runtime import halo
from .base import LocalContext


def roll_exchange(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    dim, shift, sizes, others = op["dim"], op["shift"], list(op["sizes"]), op["others"]
    x = node.args[0]
    if others:
        with graph.inserting_before(node):
            x = graph.call_function(torch.roll, (x, tuple(s for _, s in others), tuple(d for d, _ in others)))
    if shift % sum(sizes) == 0:
        node.op, node.target, node.args, node.kwargs = "call_function", torch.clone, (x,), {}
        return
    v = value(node.args[0])
    plan = halo.roll_plan(sizes, shift)
    moved = sum(length for src, _, length in plan[ctx.rank] if src != ctx.rank)
    ctx.record_collective("roll exchange", node, v.numel() // max(v.shape[dim], 1) * moved * v.element_size())
    node.op, node.target = "call_function", halo.roll_exchange
    node.args, node.kwargs = (x, dim, shift, tuple(sizes), ctx.group), {}


TABLE = [
    ("roll_exchange", roll_exchange),
]
