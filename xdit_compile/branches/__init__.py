"""CFG parallel across separate calls (``calls.py``): when it applies, and wrapping the program.

``splits_calls(plan, batch)``: a cfg degree > 1 on a graph whose batch is smaller than the
cfg x dp groups (a pipeline calling the transformer once per guidance branch, batch 1), and
``state_writes(gm)`` finds nothing that makes a call's effect more than its output. The backend
then plans the graph for the sequence axes only (each cfg group's ranks split the tokens; the cfg
groups are replicas of each other; under PipeFusion each cfg group is one pipeline) and
``wrap_calls`` puts the ``CallStream`` around the program.
Reads ``node.meta["val"]`` of the placeholders and the output; writes nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from .. import plan as plan_mod
from ..graph import input_label, is_tensor, is_user_input, op_name, value, written_inputs
from ..plan import ParallelPlan
from .calls import CallsReport, CallStream, Miss, current_branch, same_bits

__all__ = ["CallStream", "CallsReport", "Miss", "current_branch", "same_bits", "splits_calls", "state_writes",
           "stream_inputs", "wrap_calls"]


def splits_calls(plan: ParallelPlan, batch: int | None) -> bool:
    """Whether the cfg groups take the branches from separate calls: the batch has fewer rows than
    there are batch groups, so the batch split cannot give every cfg group a branch. With
    PipeFusion (pp > 1) each cfg group's pipeline computes its branch (``current_branch`` names
    the branch to the driver, which keeps one K/V stream per branch)."""
    return plan.degree("cfg") > 1 and batch is not None and batch < plan.degree("batch")


# Ops through which an in-place write reaches the tensor they were taken from.
_VIEWS = frozenset({"view", "reshape", "getitem", "select", "slice", "narrow", "transpose", "permute", "unsqueeze",
                    "squeeze", "flatten", "unflatten", "expand", "as_strided", "t", "detach", "unbind", "split",
                    "chunk", "movedim", "view_as", "reshape_as", "diagonal", "alias", "contiguous", "__getitem__"})


def state_writes(gm: fx.GraphModule) -> str | None:
    """Why a call of ``gm`` does more than return its output (then no call may be answered from a
    prediction: a skipped call would skip its effect), or None.

    An input or buffer written in place (``graph.written_inputs``, through views), or an impure op.
    """
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        for w in written_inputs(node):
            base = w
            while base.op != "placeholder" and op_name(base) in _VIEWS and base.args and isinstance(base.args[0], fx.Node):
                base = base.args[0]
            if base.op == "placeholder":
                return f"{node.name} ({op_name(node)}) writes input {input_label(base)} in place"
        if node.is_impure() and not written_inputs(node):
            return f"{node.name} ({op_name(node)}) has side effects"
    return None


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
