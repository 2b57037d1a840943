"""User annotations: state a tensor's placement inside a model; no-ops outside the backend.

    h = xdit_compile.shard(h, dim=1)        # tokens of h are split over the sequence ranks
    t = xdit_compile.replicate(t)           # t (and what only t feeds) stays whole

Annotations override inference: the propagation forces the placement at that point and
inserts whatever collective it takes to get there.
"""

from __future__ import annotations

import torch

from .axes import SEQUENCE, axis_names
from .errors import PlanError


@torch.library.custom_op("xdit::mark", mutates_args=())
def _mark(x: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
    return x.clone()


@_mark.register_fake
def _(x: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
    return torch.empty_like(x)


def shard(x: torch.Tensor, dim: int, axis: str = SEQUENCE) -> torch.Tensor:
    """Mark ``x`` as split along ``dim`` over ``axis`` (``"sp"``: sequence ranks, ``"batch"``)."""
    if axis not in axis_names():
        raise PlanError(f"annotation axis must be one of {list(axis_names())} (xdit_compile.axes), got {axis!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise PlanError(
            f"xdit_compile.shard: dim {dim!r} is out of range for a tensor of shape {tuple(x.shape)} "
            f"(give a dim in [{-x.dim()}, {x.dim() - 1}])"
        )
    return _mark(x, axis, dim % x.dim())


def replicate(x: torch.Tensor, axis: str = SEQUENCE) -> torch.Tensor:
    """Mark ``x`` as whole on every rank of ``axis`` (the ops it alone feeds stay replicated)."""
    if axis not in axis_names():
        raise PlanError(f"annotation axis must be one of {list(axis_names())} (xdit_compile.axes), got {axis!r}")
    return _mark(x, axis, -1)
