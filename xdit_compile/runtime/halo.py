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
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from xdit_compile.errors import CollectiveError

from . import collectives
from .collectives import Group, group_rank, group_size
from .redistribute import xdit_op

__all__ = ["group_norm", "halo_exchange"]


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
