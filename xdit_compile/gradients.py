"""Backward through a rewritten graph: exact where every inserted op has a gradient rule, else refused.

A graph traced for autograd (grad mode on and an input, e.g. a parameter, that requires grad)
is lowered with the gradient plumbing of ``runtime/autograd.py``:

* ``xdit_slice`` (R -> S) all-gathers the shard gradients in its backward, ``xdit_gather``
  (S -> R) keeps this rank's pieces, ``xdit_all_reduce`` (P -> R) passes the gradient through;
* :func:`insert_grad_syncs` (called by ``lower``) routes every replicated value that a node
  reads next to per-rank data (a weight in a token-sharded linear, a bias added to sharded
  tokens, a weight under the CFG batch split) through ``xdit_grad_sync``, whose backward
  all-reduces, so that its gradient is complete and the same on every rank;
* Ulysses, Ring and USP attention recompute this rank's queries against the all-gathered K/V
  in the backward (``runtime/attention_grad.py``).

Then gradients of the inputs and weights are those of one rank (``tests/test_gradients.py``).
The backend keeps the guard (:func:`guard_backward`) for what has no gradient rule: PipeFusion
(stage transfers, stale K/V), the halo exchange and global GroupNorm statistics of the
parallel VAE, and any other runtime function without the ``_xdit_differentiable`` mark
(:func:`undifferentiable_ops`). There:

* grad mode off, or no input requires grad: the call is untouched;
* otherwise the forward runs under ``torch.no_grad()`` (a forward that is never
  differentiated keeps working, and keeps no activations), and the outputs are joined to the
  inputs that require grad by ``_NoBackward``, whose backward raises ``GradientError``
  naming the plan, the ops without gradient rules, and the fix.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import GradientError
from .graph import op_name, value
from .placements import Replicate
from .runtime import redistribute as rt
from .runtime.autograd import is_differentiable, recording


class _NoBackward(torch.autograd.Function):
    """Identity on the outputs in the forward; the backward raises ``GradientError``."""

    @staticmethod
    def forward(ctx: Any, message: str, n_out: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.message = message
        # Views, so autograd gives the outputs this node as their grad_fn.
        return tuple(t.view_as(t) for t in tensors[:n_out])

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise GradientError(ctx.message)


def needs_guard(example_inputs: Sequence[Any]) -> bool:
    """Whether a graph was traced for autograd (grad mode on and an input requires grad)."""
    return recording(*example_inputs)


# gm.meta key: whether the graph is lowered for autograd (set by the backend from the real example
# inputs; fake-tensor refreshes between axes do not keep ``requires_grad`` on example values).
AUTOGRAD = "xdit_autograd"


def mark_for_autograd(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Record in ``gm.meta`` whether the lowering must add the gradient plumbing (``needs_guard``)."""
    gm.meta[AUTOGRAD] = needs_guard(example_inputs)


def traced_for_autograd(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is to be lowered for autograd: only where :func:`mark_for_autograd` said so
    (not on the PipeFusion path, whose programs refuse backward, nor for direct callers of ``lower``)."""
    return bool(gm.meta.get(AUTOGRAD, False))


# ---------------------------------------------------------------------- grad syncs
# Ops whose backward already gives a replicated input its complete gradient.
_COMPLETE_BACKWARD = {"xdit_slice", "xdit_grad_sync"}


def _per_rank(p: Any) -> bool:
    """Whether a placement (or tuple of them) holds data that differs between ranks."""
    if isinstance(p, (tuple, list)):
        return any(_per_rank(x) for x in p)
    return p is not None and not isinstance(p, Replicate)


def _tensor_value(x: fx.Node) -> Any:
    """The example value of ``x``; a ``get_attr`` (a parameter not lifted to a placeholder) without one
    is read off the module."""
    v = value(x)
    if v is None and x.op == "get_attr" and x.graph.owning_module is not None:
        v = operator.attrgetter(str(x.target))(x.graph.owning_module)
    return v


def insert_grad_syncs(graph: fx.Graph, actual: Mapping[fx.Node, Any], axis: Any) -> int:
    """Route replicated values read next to per-rank data through ``xdit_grad_sync``; return how many.

    Reads: ``actual``, the lowered graph's placements on ``axis`` (a node with none, such as
    one a rewrite inserted or an in-place ``setitem``, counts as placed like its first
    argument). A node "holds per-rank data" when its output or one of its inputs is ``Shard``
    or ``Partial``; autograd then gives each floating ``Replicate`` input only this rank's
    share of its gradient. Before / after (weight ``w`` of a token-sharded linear)::

        y = linear(x_S, w)              w_ = xdit_grad_sync(w, "1"); y = linear(x_S, w_)

    One sync per value, shared by all such readers, so their shares are summed once.
    """
    syncs: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module") or node in syncs.values():
            continue
        if op_name(node) in _COMPLETE_BACKWARD:
            continue
        out = actual.get(node)
        if out is None and node.args and isinstance(node.args[0], fx.Node):
            out = actual.get(node.args[0])
        inputs = node.all_input_nodes
        if not (_per_rank(out) or any(_per_rank(actual.get(x)) for x in inputs)):
            continue
        for x in inputs:
            v = _tensor_value(x)
            if _per_rank(actual.get(x)) or not isinstance(v, torch.Tensor) or not (
                    v.is_floating_point() or v.is_complex()):
                continue
            if x not in syncs:
                # Before its first such reader (not after x): x is read as it is there, after
                # any in-place write to it.
                with graph.inserting_before(node):
                    sync = graph.call_function(rt.grad_sync, (x, axis.group))
                sync.meta.update({k: x.meta[k] for k in ("val", "example_value") if k in x.meta})
                sync.meta.setdefault("xdit", {})[axis.name] = actual.get(x)
                syncs[x] = sync
            node.replace_input_with(x, syncs[x])
    return len(syncs)


# ---------------------------------------------------------------------- the guard
def undifferentiable_ops(gm: fx.GraphModule) -> list[str]:
    """Names of the runtime functions in ``gm`` (inserted by the passes) without a gradient rule."""
    found: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        module = getattr(node.target, "__module__", "") or ""
        if module.startswith("xdit_compile.") and not is_differentiable(node.target):
            found[str(op_name(node))] = None
        elif op_name(node) == "xdit_slice" and len(node.args) + len(node.kwargs) < 4:
            found["xdit_slice (lowered without the group its backward gathers over)"] = None
    return list(found)


def guard_backward(fn: Callable[..., Any], what: str, why: str | None = None) -> Callable[..., Any]:
    """Wrap ``fn`` (a compiled per-rank program) so that backward through it raises.

    ``what`` says what the program was rewritten for (the plan), ``why`` which of its ops have
    no gradient rule, for the message.
    """
    message = (
        f"backward through a graph that the xdit backend rewrote for {what} is not supported: "
        f"{why or 'its inserted ops have no gradient rules'}, so the gradients would be wrong. Run "
        "the compiled model under torch.no_grad() (inference); to train, keep those parts replicated "
        "(xdit_compile.replicate(x) on their input) or use a plan without them (graphs lowered only "
        "to Ulysses, Ring, USP and CFG / data parallel differentiate exactly: see the README), or "
        "train without backend='xdit' (or on one rank)."
    )

    def run(*args: Any) -> Any:
        if not recording(*args):
            return fn(*args)
        grads_from = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        with torch.no_grad():
            out = fn(*args)
        leaves, spec = tree_flatten(out)
        idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]
        if not idx:
            return out
        joined = _NoBackward.apply(message, len(idx), *[leaves[i] for i in idx], *grads_from)
        for i, t in zip(idx, joined):
            leaves[i] = t
        return tree_unflatten(leaves, spec)

    return run
