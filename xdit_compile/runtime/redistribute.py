"""The functions the lowering inserts into graphs to move a tensor between placements.

All arguments besides tensors are plain constants computed at compile time for this rank
(piece ranges, per-rank sizes, orders), so the functions trace cleanly into inductor.
Each carries ``_xdit_op`` so the passes recognise it when they meet it again (a graph
lowered on the batch axis is lowered again on the sequence axis), and ``_xdit_differentiable``:
its backward follows the gradient convention of ``runtime/autograd.py`` (a graph traced for
autograd passes ``shard_slice`` the all-gather its backward needs).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch

from . import collectives
from .autograd import differentiable, linear

F = TypeVar("F", bound=Callable)

# Above this many pieces a gather reorders with one index_select instead of narrows + cat.
_MAX_NARROWS = 64


def xdit_op(name: str) -> Callable[[F], F]:
    """Name a runtime function for the passes (``graph.op_name``), which meet it in graphs."""

    def mark(fn: F) -> F:
        fn._xdit_op = name  # type: ignore[attr-defined]
        return fn

    return mark


@xdit_op("xdit_slice")
@differentiable
def shard_slice(
    x: torch.Tensor,
    dim: int,
    ranges: Sequence[tuple[int, int]],
    group: str | None = None,
    sizes: Sequence[int] | None = None,
    order: Sequence[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """This rank's shard of a replicated ``x``: the global ``(start, length)`` ranges, in order.

    ``group``, ``sizes`` and ``order`` (those of the matching :func:`gather`) are given in graphs
    traced for autograd: the backward all-gathers every rank's shard gradient into the whole one.
    """
    forward = functools.partial(_slice, dim=dim, ranges=tuple(ranges))
    if group is None or sizes is None:
        return forward(x)
    return linear(x, forward, functools.partial(_gather, dim=dim, sizes=tuple(sizes), group=group,
                                                order=None if order is None else tuple(order)))


def _slice(x: torch.Tensor, dim: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    parts = [x.narrow(dim, start, length) for start, length in ranges]
    if len(parts) == 1:
        return parts[0].contiguous()
    return torch.cat(parts, dim=dim)


@xdit_op("xdit_gather")
@differentiable
def gather(
    x: torch.Tensor,
    dim: int,
    sizes: Sequence[int],
    group: str,
    order: Sequence[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """The full tensor from every rank's shard along ``dim``.

    ``sizes`` are the per-rank local lengths. ``order``, when the shard is not one contiguous
    block per rank, lists ``(offset in the gathered tensor, length, global start)`` pieces
    covering the global dim; the gathered pieces are put back in global order. Backward: this
    rank's pieces of the (complete) gradient.
    """
    sizes, order = tuple(sizes), None if order is None else tuple(order)
    return linear(x, functools.partial(_gather, dim=dim, sizes=sizes, group=group, order=order),
                  functools.partial(_own_pieces, dim=dim, sizes=sizes, group=group, order=order))


def _gather(
    x: torch.Tensor,
    dim: int,
    sizes: Sequence[int],
    group: str,
    order: Sequence[tuple[int, int, int]] | None,
) -> torch.Tensor:
    full = collectives.all_gather(x, dim, list(sizes), group)
    if order is None:
        return full
    if len(order) <= _MAX_NARROWS:
        ordered = sorted(order, key=lambda piece: piece[2])
        return torch.cat([full.narrow(dim, off, length) for off, length, _ in ordered], dim=dim)
    index: list[int] = [0] * sum(length for _, length, _ in order)
    for off, length, start in order:
        index[start:start + length] = range(off, off + length)
    return full.index_select(dim, torch.tensor(index, device=x.device))


def _own_pieces(
    full: torch.Tensor,
    dim: int,
    sizes: Sequence[int],
    group: str,
    order: Sequence[tuple[int, int, int]] | None,
) -> torch.Tensor:
    """This rank's shard of a whole tensor laid out as :func:`gather` returns it."""
    me = collectives.group_rank(group)
    begin = sum(sizes[:me])
    if order is None:
        return full.narrow(dim, begin, sizes[me]).contiguous()
    # Pieces whose place in the rank-ordered concatenation falls in this rank's block.
    mine = sorted((off, length, start) for off, length, start in order if begin <= off < begin + sizes[me])
    return _slice(full, dim, [(start, length) for _, length, start in mine])


@xdit_op("xdit_all_reduce")
@differentiable
def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum of every rank's ``x`` (turns a ``Partial`` tensor into a replicated one).

    Backward: the identity (a ``Partial`` value's gradient is its sum's, complete on every rank).
    """
    return linear(x, functools.partial(collectives.all_reduce, group=group), _identity)


@xdit_op("xdit_grad_sync")
@differentiable
def grad_sync(x: torch.Tensor, group: str) -> torch.Tensor:
    """Identity; the backward sums the gradient over ``group``.

    The lowering puts it (in graphs traced for autograd) between a ``Replicate`` value and the
    nodes that read it next to per-rank data, whose local gradients are each rank's share.
    """
    return linear(x, _identity, functools.partial(collectives.all_reduce, group=group))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.view_as(x)


@xdit_op("xdit_align_mask")
@differentiable
def align_mask(mask: torch.Tensor, q_index: Sequence[int] | None, k_index: Sequence[int] | None) -> torch.Tensor:
    """Rows and columns of a replicated attention mask in the order the queries/keys arrive."""
    if q_index is not None and mask.dim() >= 2 and mask.size(-2) > 1:
        mask = mask.index_select(-2, torch.tensor(list(q_index), device=mask.device))
    if k_index is not None and mask.size(-1) > 1:
        mask = mask.index_select(-1, torch.tensor(list(k_index), device=mask.device))
    return mask
