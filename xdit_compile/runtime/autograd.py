"""Gradient rules of the functions the lowering inserts, so backward through a per-rank program is exact.

One convention says what a rank holds of a gradient, for each placement of the forward value:

* ``Replicate``: the complete gradient, identical on every rank of the axis;
* ``Shard``: the gradient of this rank's shard (complete for those elements);
* ``Partial``: the complete gradient (the same as that of the sum over the axis).

Local ops (every op of the original graph, run on local tensors) keep it by themselves, except
one case: a ``Replicate`` value read by a node that holds per-rank data (an input or the output
is ``Shard`` or ``Partial``: a weight in a token-sharded linear, a bias added to sharded tokens)
gets from local autograd only this rank's contribution. The lowering routes such values through
:func:`grad_sync` (Megatron's "f": identity forward, all-reduce backward). The collectives:

==========================  =====================  ==========================================
function                    forward                backward
==========================  =====================  ==========================================
``shard_slice`` (R -> S)    this rank's pieces     all-gather of the shard gradients
``gather`` (S -> R)         all-gather             this rank's pieces of the gradient
``all_reduce`` (P -> R)     all-reduce             identity
``grad_sync`` (R -> R)      identity               all-reduce
==========================  =====================  ==========================================

Every function here is linear in its tensor, so one ``torch.autograd.Function`` (``_Linear``)
carries a forward and its adjoint as plain callables. They trace into inductor like the rest:
aot_autograd runs the backward callables under its tracer, and they call only functional
collectives (``runtime/redistribute.py`` holds the four functions). Runtime functions marked
with :func:`differentiable` are those whose gradients follow this convention;
``gradients.undifferentiable_ops`` reads the mark off a lowered graph.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def differentiable(fn: F) -> F:
    """Mark a runtime function whose backward follows the module's gradient convention."""
    fn._xdit_differentiable = True  # type: ignore[attr-defined]
    return fn


def is_differentiable(fn: Any) -> bool:
    return bool(getattr(fn, "_xdit_differentiable", False))


def recording(*tensors: Any) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _Linear(torch.autograd.Function):
    """``forward(x)`` for a linear map whose adjoint, under the convention above, is ``backward``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                backward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.adjoint = backward
        return forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.adjoint(grad.contiguous()), None, None


def linear(x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
           backward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``forward(x)``, recorded for autograd with ``backward`` as its gradient when needed."""
    if recording(x):
        return _Linear.apply(x, forward, backward)
    return forward(x)
