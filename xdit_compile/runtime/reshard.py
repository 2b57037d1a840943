"""Direct redistributions: one collective per placement change, no replicated hub.

The lowering used to turn every change into "make it whole, then slice": ``Shard(a) ->
Shard(b)`` was an all-gather plus a slice, ``Partial -> Shard`` an all-reduce plus a slice, each
n times the bytes of the collective that does the change in one step. This module holds those
collectives and the one table that says which a change takes and what it costs:

=======================  ===================  ==========================================  ====================
change                   collective           a rank receives (nbytes: the whole tensor)  runtime function
=======================  ===================  ==========================================  ====================
``R -> S``               none (a slice)       0                                           ``shard_slice``
``S -> R``               all-gather           nbytes * (n-1)/n                            ``gather``
``S(a) -> S(b)``, a!=b   all-to-all           nbytes * (n-1)/n^2                          ``reshard``
``S(a) -> S'(a)``        all-gather + slice   nbytes * (n-1)/n (a re-split of one dim)    ``gather``, slice
``P -> R``               all-reduce           2 * nbytes * (n-1)/n (reduce-scatter +      ``all_reduce``
                                              all-gather, as ring all-reduces run)
``P -> S``               reduce-scatter       nbytes * (n-1)/n                            ``reduce_scatter``
=======================  ===================  ==========================================  ====================

Bytes are counted as ``propagate.redistribution_bytes`` always counted them (what one rank
receives) and as the attention strategies count theirs (Ulysses: ``q_bytes * (n-1)/n^2`` per
all-to-all), so the plan search compares like with like.

Uneven and multi-segment shards (``S(1:7+64)``) are handled exactly: the sender puts each
destination rank's pieces next to each other before the collective, the receiver puts the
pieces back in global order after it. Both functions are linear and carry their adjoints
(``runtime/autograd.py``): the backward of an all-to-all is the all-to-all back; that of a
reduce-scatter is the all-gather of the shard gradients (a ``Partial`` value's gradient is
complete on every rank).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.distributed._functional_collectives as funcol

from ..placements import Partial, Replicate, Shard, pieces
from . import collectives
from .autograd import differentiable, linear
from .redistribute import _MAX_NARROWS, xdit_op

Pieces = tuple[tuple[int, ...], ...]  # per rank: that rank's (start, length) pieces, flattened


# ------------------------------------------------------------------------------ the table

def kind(src: Any, dst: Any) -> str | None:
    """The collective that turns placement ``src`` into ``dst``: ``"all_to_all"``,
    ``"reduce_scatter"``, ``"all_reduce"``, ``"all_gather"`` (also for a re-split of the same
    dim: gathered, then sliced), ``"slice"`` (free), or ``None`` (no change, or none exists)."""
    if src == dst:
        return None
    if isinstance(src, Replicate):
        return "slice" if isinstance(dst, Shard) else None
    if isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return "all_reduce"
        return "reduce_scatter" if isinstance(dst, Shard) else None
    if isinstance(src, Shard):
        if isinstance(dst, Shard) and dst.dim != src.dim:
            return "all_to_all"
        return "all_gather" if isinstance(dst, (Replicate, Shard)) else None
    return None


def received_bytes(src: Any, dst: Any, nbytes: float, n: int) -> float:
    """Bytes one rank receives to turn ``src`` into ``dst`` for a tensor of ``nbytes`` (see the table)."""
    k = kind(src, dst)
    if k is None or k == "slice" or n <= 1:
        return 0.0
    if k == "all_to_all":
        return nbytes * (n - 1) / n / n
    if k == "all_reduce":
        return 2.0 * nbytes * (n - 1) / n
    return nbytes * (n - 1) / n  # all-gather, reduce-scatter


# ------------------------------------------------------------------------------ layouts

def layout(p: Shard, n: int) -> Pieces:
    """Every rank's pieces of ``p`` (global ``(start, length)`` pairs, flattened), in rank order:
    the plain constants :func:`reshard` and :func:`reduce_scatter` take for a shard."""
    return tuple(tuple(v for piece in pieces(p, n, r) for v in piece) for r in range(n))


def _pairs(flat: Sequence[int]) -> list[tuple[int, int]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _lengths(lay: Pieces) -> list[int]:
    return [sum(length for _, length in _pairs(r)) for r in lay]


def _take(x: torch.Tensor, dim: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The concatenation of global ``ranges`` of ``x`` along ``dim`` (``x`` whole along ``dim``)."""
    if len(ranges) == 1 and ranges[0] == (0, x.size(dim)):
        return x
    if len(ranges) <= _MAX_NARROWS:
        return torch.cat([x.narrow(dim, start, length) for start, length in ranges], dim=dim)
    index = [i for start, length in ranges for i in range(start, start + length)]
    return x.index_select(dim, torch.tensor(index, device=x.device))


def _rank_major(x: torch.Tensor, dim: int, lay: Pieces) -> torch.Tensor:
    """``x`` (whole along ``dim``) with rank 0's pieces first, then rank 1's, ...: what a
    collective that sends block j to rank j wants."""
    return _take(x, dim, [piece for r in lay for piece in _pairs(r)])


def _global_order(x: torch.Tensor, dim: int, lay: Pieces) -> torch.Tensor:
    """The inverse of :func:`_rank_major`: pieces that arrived in rank order put back in global order."""
    where, off = [], 0
    for r in lay:
        for start, length in _pairs(r):
            where.append((start, off, length))
            off += length
    where.sort()
    if all(a[1] <= b[1] for a, b in zip(where, where[1:])):
        return x  # rank order is already global order (one contiguous block per rank)
    return _take(x, dim, [(off, length) for _, off, length in where])


# ------------------------------------------------------------------------------ all-to-all

@xdit_op("xdit_reshard")
@differentiable
def reshard(x: torch.Tensor, src_dim: int, src: Pieces, dst_dim: int, dst: Pieces, group: str) -> torch.Tensor:
    """``Shard(src_dim) -> Shard(dst_dim)`` in one all-to-all.

    ``src`` / ``dst``: every rank's global pieces of ``src_dim`` / ``dst_dim`` (:func:`layout`).
    This rank sends rank j its pieces of ``dst_dim`` (all of its ``src_dim`` shard) and gets
    back every rank's ``src_dim`` shard of its own ``dst_dim`` pieces. Backward: the all-to-all
    back (``dst -> src``).
    """
    return linear(x, functools.partial(_reshard, src_dim=src_dim, src=src, dst_dim=dst_dim, dst=dst, group=group),
                  functools.partial(_reshard, src_dim=dst_dim, src=dst, dst_dim=src_dim, dst=src, group=group))


def _reshard(x: torch.Tensor, src_dim: int, src: Pieces, dst_dim: int, dst: Pieces, group: str) -> torch.Tensor:
    send = _rank_major(x, dst_dim, dst)
    moved = collectives.all_to_all(send, dst_dim, src_dim, group, _lengths(dst), _lengths(src))
    return _global_order(moved, src_dim, src)


# ------------------------------------------------------------------------------ reduce-scatter

@xdit_op("xdit_reduce_scatter")
@differentiable
def reduce_scatter(x: torch.Tensor, dim: int, dst: Pieces, group: str) -> torch.Tensor:
    """``Partial -> Shard(dim)`` in one reduce-scatter: this rank's pieces (``dst``, :func:`layout`)
    of the sum over ``group``. Backward: every rank's shard gradient gathered (the whole gradient)."""
    return linear(x, functools.partial(_reduce_scatter, dim=dim, dst=dst, group=group),
                  functools.partial(_all_gather, dim=dim, dst=dst, group=group))


def _reduce_scatter(x: torch.Tensor, dim: int, dst: Pieces, group: str) -> torch.Tensor:
    lengths = _lengths(dst)
    longest, me = max(lengths), collectives.group_rank(group)
    blocks = []
    for r, own in enumerate(dst):  # rank r's pieces, padded to the longest block
        block = _take(x, dim, _pairs(own)) if own else x.narrow(dim, 0, 0)
        if lengths[r] < longest:
            pad = list(x.shape)
            pad[dim] = longest - lengths[r]
            block = torch.cat([block, x.new_zeros(pad)], dim=dim)
        blocks.append(block.movedim(dim, 0))
    send = torch.cat(blocks, dim=0).contiguous()
    collectives._record("reduce_scatter", send, len(dst))
    out = collectives._waited(funcol.reduce_scatter_single(send, "sum", 0, group))
    return out.narrow(0, 0, lengths[me]).movedim(0, dim).contiguous()


def _all_gather(x: torch.Tensor, dim: int, dst: Pieces, group: str) -> torch.Tensor:
    full = collectives.all_gather(x, dim, _lengths(dst), group)
    return _global_order(full, dim, dst)
