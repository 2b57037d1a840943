"""Reductions: reducing another dim keeps the shard; summing the sharded dim gives ``Partial``.

    sum(x: S(1), dim=-1)  -> S(1)
    sum(k: S(1), dim=1)   -> P         (an all-reduce is inserted only where R is needed)
    mean(x: S(1), dim=1)  -> P         local op mean_as_sum: sum(x) / global_count
    amax(x: S(1), dim=1)  -> needs R
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..graph import shape
from ..placements import PARTIAL, Shard
from .core import Decision, OpView, local_op, on_first_shard
from .pointwise import pointwise


def _dim_index(name: str) -> int:
    """Position of ``dim`` in the op's arguments (``norm(x, p, dim, keepdim)`` has ``p`` first)."""
    return 2 if name == "norm" else 1


def _reduced_dims(op: OpView, ndim: int) -> list[int] | None:
    dim = op.arg(_dim_index(op.name), "dim")
    if isinstance(dim, bool):  # std(x, unbiased) / var(x, unbiased): over every dim
        dim = None
    if dim is None or dim == ():
        return None if op.name in ("sum", "mean") and dim is None else list(range(ndim))
    if isinstance(dim, int):
        return [dim % ndim]
    return [d % ndim for d in dim]


def _keepdim(op: OpView) -> bool:
    # std(x, dim, unbiased, keepdim) and var(...) put ``unbiased`` before ``keepdim``.
    index = 3 if op.name in ("std", "var") else _dim_index(op.name) + 1
    return bool(op.arg(index, "keepdim", False))


def reduction(op: OpView) -> Decision | None:
    if isinstance(op.arg(1, "other"), fx.Node):  # torch.max(a, b) is elementwise
        return pointwise(op)
    d = _reduction(op)
    if d is not None and isinstance(op.out_value, tuple):  # (values, indices)
        d = dataclasses.replace(d, out=(d.out, d.out))
    return d


@on_first_shard
def _reduction(op: OpView, x: fx.Node, p: Shard, others: dict) -> Decision | None:
    ndim = len(shape(x))
    dims = _reduced_dims(op, ndim)
    if dims is None:
        dims = list(range(ndim))
    if p.dim not in dims:
        new_dim = p.dim if _keepdim(op) else p.dim - sum(1 for d in dims if d < p.dim)
        return Decision(p.with_dim(new_dim))
    if op.name == "sum":
        return Decision(PARTIAL)
    if op.name == "mean":
        return Decision(PARTIAL, local=local_op("mean_as_sum"))
    return None


TABLE = [
    (["sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "logsumexp", "all", "any",
      "argmax", "argmin"], reduction),
]
