"""Facts about a graph and a plan that the backend, PipeFusion and the agreement check all read.

They live here, below all three, so that none of them imports another for them (no import cycle):

    graph_facts(gm)        -> (batch size, attention heads): what the automatic plan resolves against
    mesh_axes(plan, rank)  -> the logical axes (``axes.AXES``, in order) this rank lowers, with their groups

Reads ``node.meta["val"]`` (through ``graph.shape`` / ``graph.value``); writes nothing.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from . import axes
from . import plan as plan_mod
from .axis import Axis
from .graph import is_tensor, is_user_input, op_name, shape, value
from .plan import ParallelPlan


def graph_facts(gm: fx.GraphModule) -> tuple[int | None, int | None]:
    """(batch size, attention heads) read off the graph, for the automatic plan."""
    batch = None
    biggest = -1
    for node in gm.graph.nodes:
        if node.op == "placeholder" and is_tensor(node) and is_user_input(node):
            s = shape(node)
            if len(s) >= 2 and isinstance(s[0], int) and value(node).numel() > biggest:
                biggest, batch = value(node).numel(), s[0]
    heads = None
    for node in gm.graph.nodes:
        if op_name(node) == "scaled_dot_product_attention":
            q = node.args[0] if node.args else node.kwargs.get("query")
            h = shape(q)[-3] if len(shape(q)) >= 3 else 1
            heads = h if heads is None else min(heads, h)
    return batch, heads


def mesh_axes(plan: ParallelPlan, rank: int) -> list[Axis]:
    """The logical axes (``axes.AXES``, in order) this rank's passes lower, with their process groups."""
    groups = plan_mod.process_groups(plan)
    out = []
    for spec in axes.AXES:
        n = plan.degree(spec.name)
        if n <= 1:
            continue
        kw: dict[str, Any] = spec.sub_groups(plan.degree, groups) if spec.sub_groups else {}
        out.append(Axis(spec.name, n, plan.axis_rank(spec.name, rank), groups[spec.name].group_name, **kw))
    return out
