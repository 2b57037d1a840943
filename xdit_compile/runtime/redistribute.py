"""The functions the lowering inserts into graphs to move a tensor between placements.

All arguments besides tensors are plain constants computed at compile time for this rank
(piece ranges, per-rank sizes, orders), so the functions trace cleanly into inductor.
Each carries ``_xdit_op`` so the passes recognise it when they meet it again (a graph
lowered on the batch axis is lowered again on the sequence axis).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

from . import collectives

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
def shard_slice(x: torch.Tensor, dim: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """This rank's shard of a replicated ``x``: the global ``(start, length)`` ranges, in order."""
    parts = [x.narrow(dim, start, length) for start, length in ranges]
    if len(parts) == 1:
        return parts[0].contiguous()
    return torch.cat(parts, dim=dim)


@xdit_op("xdit_gather")
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
    covering the global dim; the gathered pieces are put back in global order.
    """
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


@xdit_op("xdit_all_reduce")
def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum of every rank's ``x`` (turns a ``Partial`` tensor into a replicated one)."""
    return collectives.all_reduce(x, group)


@xdit_op("xdit_align_mask")
def align_mask(mask: torch.Tensor, q_index: Sequence[int] | None, k_index: Sequence[int] | None) -> torch.Tensor:
    """Rows and columns of a replicated attention mask in the order the queries/keys arrive."""
    if q_index is not None and mask.dim() >= 2 and mask.size(-2) > 1:
        mask = mask.index_select(-2, torch.tensor(list(q_index), device=mask.device))
    if k_index is not None and mask.size(-1) > 1:
        mask = mask.index_select(-1, torch.tensor(list(k_index), device=mask.device))
    return mask
