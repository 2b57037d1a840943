"""Runtime for feature maps sharded along a spatial dim: halo exchange and global GroupNorm.

Both functions trace into graphs (they use only the functional collectives of
``runtime.collectives``), take plain constants besides tensors, and carry ``_xdit_op`` so
the passes recognise them when a lowered graph is lowered again on another axis.

Halo exchange, 3 ranks, ``before = after = 1`` (a 3x3 convolution with padding 1)::

    rank 0: [ 0 | r0 rows | first row of r1 ]      zeros at the global top edge
    rank 1: [ last row of r0 | r1 rows | first row of r2 ]
    rank 2: [ last row of r1 | r2 rows | 0 ]       zeros at the global bottom edge

The convolution then runs on the haloed shard with no padding on that dim and yields exactly
this rank's rows of the full result. One ``all_to_all_single`` per exchange: every rank sends
its head to the previous rank and its tail to the next one.

GroupNorm over a sharded dim: every rank sums ``x`` and ``x * x`` per (sample, group) in
float32, one all-reduce adds the partial sums, and every rank normalises its own elements with
the global mean and variance (``E[x^2] - E[x]^2`` over all elements of the group).

Roll along a sharded dim (Swin's shifted windows): ``torch.roll(x, s, d)`` moves global row
``j`` to ``(j + s) mod L``, so each rank needs the cyclic range ``[start - s, stop - s)`` of
the global rows. :func:`roll_exchange` cuts that range at the shard boundaries (the sizes are
compile-time constants), keeps what it holds, and gets the rest in one ``all_to_all_single``:
with a shift smaller than every shard, each rank sends its last ``s`` rows to the next rank
(``s`` rows per rank instead of an all-gather's ``(N-1)/N`` of the tensor). Any shift works
(negative, larger than a shard, larger than ``L``), and uneven shards too.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.distributed._functional_collectives as funcol

from xdit_compile.errors import CollectiveError

from . import collectives
from .autograd import differentiable, linear
from .collectives import Group, group_rank, group_size
from .redistribute import xdit_op

__all__ = ["group_norm", "halo_exchange", "roll_exchange", "roll_plan"]


@xdit_op("xdit_halo")
def halo_exchange(x: torch.Tensor, dim: int, before: int, after: int, group: Group) -> torch.Tensor:
    """``x`` with ``before`` rows of the previous rank and ``after`` rows of the next one.

    Rows come from the neighbouring group ranks (group-rank order is the order of the
    shards along ``dim``); at the global edges they are zeros, as a zero-padded convolution
    expects. Every rank must hold at least ``max(before, after)`` rows, checked here.
    """
    dim = dim % x.dim()
    if before < 0 or after < 0:
        raise CollectiveError(f"halo_exchange: negative halo ({before}, {after}) for shape {tuple(x.shape)}")
    if before == 0 and after == 0:
        return x
    size, me = group_size(group), group_rank(group)
    rows = x.size(dim)
    if rows < max(before, after):
        raise CollectiveError(
            f"halo_exchange: group rank {me} holds {rows} rows along dim {dim} (shape {tuple(x.shape)}) "
            f"but the halo needs {max(before, after)}; use fewer ranks or a larger input."
        )
    edge_shape = list(x.shape)
    prev, nxt = me - 1, me + 1
    # What this rank sends: its first `after` rows to the previous rank (they are that rank's
    # bottom halo) and its last `before` rows to the next rank (its top halo).
    head = x.narrow(dim, 0, after) if prev >= 0 else None
    tail = x.narrow(dim, rows - before, before) if nxt < size else None
    send_parts, input_splits = [], [0] * size
    row_numel = x.numel() // rows
    if head is not None and after:
        send_parts.append(head.contiguous().reshape(-1))
        input_splits[prev] = after * row_numel
    if tail is not None and before:
        send_parts.append(tail.contiguous().reshape(-1))
        input_splits[nxt] = before * row_numel
    output_splits = [0] * size
    if prev >= 0 and before:
        output_splits[prev] = before * row_numel
    if nxt < size and after:
        output_splits[nxt] = after * row_numel
    send = torch.cat(send_parts) if send_parts else x.new_empty(0)
    collectives._record("halo", send, size)
    recv = funcol.all_to_all_single(send, output_splits, input_splits, group)
    if isinstance(recv, funcol.AsyncCollectiveTensor):
        recv = recv.wait()

    def rows_of(n: int, flat: torch.Tensor | None) -> torch.Tensor:
        shape = list(edge_shape)
        shape[dim] = n
        if flat is None:
            return x.new_zeros(shape)
        # Rows travel with `dim` in its place: the sender's narrow was made contiguous as is.
        return flat.view(shape)

    parts = []
    offset = 0
    if before:
        top = None
        if prev >= 0:
            top = recv.narrow(0, offset, before * row_numel)
            offset += before * row_numel
        parts.append(rows_of(before, top))
    parts.append(x)
    if after:
        bottom = recv.narrow(0, offset, after * row_numel) if nxt < size else None
        parts.append(rows_of(after, bottom))
    return torch.cat(parts, dim=dim)


@xdit_op("xdit_group_norm")
def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    count: int,
    group: Group,
) -> torch.Tensor:
    """``F.group_norm`` of the full tensor, computed on this rank's shard of a spatial dim.

    ``count`` is the global number of elements per (sample, group): channels per group times
    the product of the global spatial sizes. Statistics are float32 sums all-reduced over
    ``group``; the result has ``x``'s dtype, like ``F.group_norm``.
    """
    b, c = x.shape[0], x.shape[1]
    if c % num_groups:
        raise CollectiveError(f"group_norm: {c} channels do not split into {num_groups} groups")
    xf = x.float().reshape(b, num_groups, -1)
    sums = torch.stack([xf.sum(dim=2), (xf * xf).sum(dim=2)])
    sums = collectives.all_reduce(sums, group)
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0.0)
    rstd = torch.rsqrt(var + eps)
    y = ((xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
    affine = [1] * x.dim()
    affine[1] = c
    if weight is not None:
        y = y * weight.float().reshape(affine)
    if bias is not None:
        y = y + bias.float().reshape(affine)
    return y.to(x.dtype)


def roll_plan(sizes: Sequence[int], shift: int) -> list[list[tuple[int, int, int]]]:
    """Per destination rank, the ``(source rank, local start, length)`` pieces, in order, of its
    rows of ``torch.roll`` by ``shift`` along a dim split into ``sizes`` contiguous shards."""
    total = sum(sizes)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    shift = shift % total if total else 0
    plan: list[list[tuple[int, int, int]]] = []
    for dst, size in enumerate(sizes):
        pieces: list[tuple[int, int, int]] = []
        pos, left = (starts[dst] - shift) % total if total else 0, size
        while left:
            src = max(r for r in range(len(sizes)) if starts[r] <= pos and sizes[r])
            take = min(left, starts[src] + sizes[src] - pos)
            pieces.append((src, pos - starts[src], take))
            pos, left = (pos + take) % total, left - take
        plan.append(pieces)
    return plan


@xdit_op("xdit_roll")
@differentiable
def roll_exchange(x: torch.Tensor, dim: int, shift: int, sizes: Sequence[int], group: Group) -> torch.Tensor:
    """This rank's shard of ``torch.roll(full, shift, dim)``, where ``full`` is the concatenation
    along ``dim`` of every group rank's shard (of lengths ``sizes``, in group-rank order).

    Linear, with the roll by ``-shift`` as its adjoint: under the gradient convention of
    ``runtime/autograd.py`` its backward is the same exchange the other way round.
    """
    dim = dim % x.dim()
    sizes = tuple(int(s) for s in sizes)
    size, me = group_size(group), group_rank(group)
    if len(sizes) != size or x.size(dim) != sizes[me]:
        raise CollectiveError(
            f"roll_exchange: group rank {me} of {size} holds {x.size(dim)} rows along dim {dim} "
            f"(shape {tuple(x.shape)}) but the shard sizes are {list(sizes)}; every rank of the group "
            "must run the same lowered program."
        )
    forward = functools.partial(_roll_rows, dim=dim, shift=shift, sizes=sizes, group=group)
    backward = functools.partial(_roll_rows, dim=dim, shift=-shift, sizes=sizes, group=group)
    return linear(x, forward, backward)


def _roll_rows(x: torch.Tensor, dim: int, shift: int, sizes: tuple[int, ...], group: Group) -> torch.Tensor:
    size, me = group_size(group), group_rank(group)
    plan = roll_plan(sizes, shift)
    row_numel = 1  # from the shape, not numel // rows: a rank may hold no rows
    for i, extent in enumerate(x.shape):
        if i != dim:
            row_numel *= extent
    # What this rank sends to each peer: its pieces of that peer's range, in the peer's order.
    send_parts, input_splits = [], [0] * size
    for dst in range(size):
        if dst == me:
            continue
        for src, start, length in plan[dst]:
            if src == me:
                send_parts.append(x.narrow(dim, start, length).contiguous().reshape(-1))
                input_splits[dst] += length * row_numel
    output_splits = [0] * size
    for src, _, length in plan[me]:
        if src != me:
            output_splits[src] += length * row_numel
    if all(src == dst for dst in range(size) for src, _, _ in plan[dst]):
        # Decided on the whole plan, so that every rank skips the collective or none does.
        return _joined(x, dim, [x.narrow(dim, start, length) for _, start, length in plan[me]])
    send = torch.cat(send_parts) if send_parts else x.new_empty(0)
    collectives._record("roll", send, size)
    recv = funcol.all_to_all_single(send, output_splits, input_splits, group)
    if isinstance(recv, funcol.AsyncCollectiveTensor):
        recv = recv.wait()
    # The received buffer holds each source's pieces in source-rank order, each in plan order.
    offsets = [sum(output_splits[:r]) for r in range(size)]
    parts = []
    for src, start, length in plan[me]:
        if src == me:
            parts.append(x.narrow(dim, start, length))
            continue
        shape = list(x.shape)
        shape[dim] = length
        parts.append(recv.narrow(0, offsets[src], length * row_numel).view(shape))
        offsets[src] += length * row_numel
    return _joined(x, dim, parts)


def _joined(x: torch.Tensor, dim: int, parts: list[torch.Tensor]) -> torch.Tensor:
    # A new tensor, as torch.roll returns: an in-place write to the result must not reach x.
    if not parts:
        return x.clone()  # this rank holds no rows
    return parts[0].clone(memory_format=torch.contiguous_format) if len(parts) == 1 else torch.cat(parts, dim=dim)
