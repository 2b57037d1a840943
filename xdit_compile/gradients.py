"""Backward through a rewritten graph: refused with a clear error, never silently wrong.

The per-rank program holds collectives (all-to-alls, gathers, ring shifts, point-to-point
transfers) and slices that have no gradient rules yet, so autograd through it would give
wrong gradients (each rank would see only its own shard's contribution, and ranks would not
even agree). Until those rules exist, ``guard_backward`` wraps the compiled callable:

* grad mode off, or no input requires grad: the call is untouched;
* otherwise the forward runs under ``torch.no_grad()`` (a forward that is never
  differentiated keeps working, and keeps no activations), and the outputs are joined to the
  inputs that require grad by ``_NoBackward``, whose backward raises ``GradientError``
  naming the plan and the fix.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import GradientError


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
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def guard_backward(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    """Wrap ``fn`` (a compiled per-rank program) so that backward through it raises.

    ``what`` says what the program was rewritten for (the plan), for the message.
    """
    message = (
        f"backward through a graph that the xdit backend rewrote for {what} is not supported: its "
        "collectives and shard slices have no gradient rules, so the gradients would be wrong. Run the "
        "compiled model under torch.no_grad() (inference), or train with a plan of degree 1 "
        "(torch.compile without backend='xdit', or on one rank)."
    )

    def run(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args)
        grads_from = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if not grads_from:
            return fn(*args)
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

    run._xdit_inner = fn  # type: ignore[attr-defined]
    return run
