"""CFG parallel across separate calls (``calls.py``): when it applies, and wrapping the program.

``splits_calls(plan, batch)``: a cfg degree > 1 on a graph whose batch does not divide into the
cfg x dp groups (a pipeline calling the transformer once per guidance branch, batch 1). The
backend then plans the graph for the sequence axes only (each cfg group's ranks split the
tokens; the cfg groups are replicas of each other) and ``wrap_calls`` puts the ``CallStream``
around the program. Reads ``node.meta["val"]`` of the placeholders and the output; writes nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from .. import plan as plan_mod
from ..graph import input_label, is_tensor, is_user_input, value
from ..plan import ParallelPlan
from .calls import CallsReport, CallStream, Miss, same_bits

__all__ = ["CallStream", "CallsReport", "Miss", "splits_calls", "wrap_calls", "same_bits", "stream_inputs"]


def splits_calls(plan: ParallelPlan, batch: int | None) -> bool:
    """Whether the cfg groups take the branches from separate calls rather than from the batch."""
    groups = plan.degree("batch")
    return plan.degree("cfg") > 1 and plan.degree("pp") == 1 and (batch is None or batch % groups != 0)


def stream_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[str], list[int], int | None]:
    """(label per flat input, timestep-like inputs, latent) read off the graph before it is lowered.

    The latent is the largest user tensor shaped like the first tensor output (a denoiser returns
    a prediction shaped like its latent), else the largest user tensor; the timestep-like inputs
    are the user tensors of at most one dim and at most the latent's batch elements (timestep,
    guidance), whose values tell the steps apart.
    """
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    labels = [input_label(n) for n in phs]
    users = [(i, n) for i, n in enumerate(phs) if i < len(example_inputs)
             and isinstance(example_inputs[i], torch.Tensor) and is_tensor(n) and is_user_input(n)]
    if not users:
        return labels, [], None
    out_shapes = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            for leaf in _leaves(node.args):
                v = leaf.meta.get("val") if isinstance(leaf, fx.Node) else None
                if isinstance(v, torch.Tensor):
                    out_shapes.add(tuple(v.shape))
    size = lambda t: example_inputs[t[0]].numel()  # noqa: E731
    shaped = [t for t in users if tuple(example_inputs[t[0]].shape) in out_shapes]
    latent = max(shaped or users, key=size)[0]
    x = example_inputs[latent]
    b = x.shape[0] if x.dim() else 1
    keys = [i for i, n in users if i != latent and value(n).dim() <= 1 and value(n).numel() <= b]
    return labels, keys, latent


def _leaves(args: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(args, out.append)
    return out


def wrap_calls(program: Callable[..., Any], inputs: tuple[list[str], list[int], int | None], plan: ParallelPlan,
               graph: str) -> CallStream:
    """``program`` behind a ``CallStream`` over this rank's cfg group (``inputs``: ``stream_inputs``)."""
    labels, keys, latent = inputs
    group = plan_mod.process_groups(plan)["cfg"]
    rank = dist.get_rank()
    order = [plan.axis_rank("cfg", r) for r in dist.get_process_group_ranks(group)]
    report = CallsReport(graph, plan.degree("cfg"), plan.axis_rank("cfg", rank))
    return CallStream(program, labels, keys, latent, group.group_name, plan.degree("cfg"),
                      plan.axis_rank("cfg", rank), order, report)
