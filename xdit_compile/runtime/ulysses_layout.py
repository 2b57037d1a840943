"""Ulysses' all-to-alls with one copy on each side: layouts chosen for the buffers, not the math.

The generic :func:`collectives.all_to_all` moves the scatter dim to the front (one copy), sends,
and concatenates the received pieces along the gather dim (a second copy); Ulysses used to add a
``torch.stack`` of q/k/v in front (a third). Here the buffers are laid out so that:

* **heads out** (:func:`scatter_heads`): the send buffer is ``[N, s, T, B, H/N, D]`` (destination
  rank's head group first, then this rank's positions), built from the T same-shaped inputs
  (q, k, v) by a single ``torch.stack`` that reads any input strides, e.g. a projection's output
  viewed heads-major. What arrives is ``[S, T, B, H/N, D]`` with the ranks' shards already
  concatenated along the sequence (uneven shards included), and the kernel reads each of the T
  tensors as a strided ``[B, H/N, S, D]`` view of it (ATen's CPU flash kernel, like the CUDA
  ones, takes any strides with a unit last dim): no copy on the receive side.
* **heads back** (:func:`gather_heads`): the kernel's output is sent as ``[S, B, H/N, D]`` (free
  when the kernel already wrote it sequence-major, else one copy), and what arrives,
  ``[N, s, B, H/N, D]``, is copied once into ``[B, s, H, D]`` and returned as a
  ``[B, H, s, D]`` view, the layout the output projection's ``transpose(1, 2).reshape`` wants
  (so that reshape is free too).

Eagerly on CPU the send and receive buffers come from ``runtime/buffers.py``'s pool (kept
between calls: a fresh 56 MiB buffer is faulted in page by page on every call); traced code
allocates them as usual. Bytes handed to the network are exactly those of the generic path (``record_collectives`` sees
the same ``all_to_all`` records). All sizes are Python ints, so the code traces and compiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from xdit_compile.runtime.buffers import pooling, scratch
from xdit_compile.runtime.collectives import (
    Group,
    _record,
    _waited,
    funcol,
    group_rank,
    group_size,
)

__all__ = ["gather_heads", "scatter_heads"]


def scatter_heads(tensors: Sequence[torch.Tensor], group: Group, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Sequence shards with all heads -> the whole sequence with this rank's 1/N of the heads.

    ``tensors``: T tensors of one shape [B, H, sizes[r], D] (H divisible by N, checked by the
    caller), this rank r's shard of the sequence; ``sizes`` every rank's shard length (global).
    Returns T tensors [B, H/N, sum(sizes), D], strided views of one receive buffer, in the
    shards' order along the sequence, heads ``r * H/N .. (r + 1) * H/N - 1``.
    """
    n = group_size(group)
    b, h, s, d = tensors[0].shape
    hn, t = h // n, len(tensors)
    # [B, N, h, s, D] -> [N, s, B, h, D] is a view; the stack at dim 2 is the only copy.
    pieces = [x.view(b, n, hn, s, d).permute(1, 3, 0, 2, 4) for x in tensors]
    per_position = t * b * hn * d
    recv_sizes, send_sizes = [sizes[j] * per_position for j in range(n)], [s * per_position] * n
    if pooling(tensors[0]):
        # Eagerly, both sides go to buffers kept between calls (runtime/buffers.py): packed q/k/v
        # is large enough to be a fresh mmap, faulted in page by page, on every call otherwise.
        send = scratch(f"ulysses.send{t}", (n, s, t, b, hn, d), tensors[0].dtype, tensors[0].device)
        torch.stack(pieces, dim=2, out=send)
        _record("all_to_all", send, n)
        flat = _pooled_all_to_all(send, recv_sizes, send_sizes, group, f"ulysses.recv{t}")
    else:
        send = torch.stack(pieces, dim=2)
        _record("all_to_all", send, n)
        flat = _waited(funcol.all_to_all_single(send.view(-1), recv_sizes, send_sizes, group))
    recv = flat.view(sum(sizes), t, b, hn, d)
    return [recv[:, i].permute(1, 2, 0, 3) for i in range(t)]


def gather_heads(out: torch.Tensor, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`scatter_heads` for one tensor: [B, H/N, sum(sizes), Dv] -> this
    rank's shard [B, H, sizes[r], Dv], a view of a ``[B, sizes[r], H, Dv]`` contiguous tensor."""
    n, me = group_size(group), group_rank(group)
    b, hn, _, d = out.shape
    s = sizes[me]
    send = out.permute(2, 0, 1, 3).contiguous()  # [S, B, h, Dv]: free if the kernel wrote it so
    per_position = b * hn * d
    _record("all_to_all", send, n)
    recv_sizes, send_sizes = [s * per_position] * n, [sizes[j] * per_position for j in range(n)]
    if pooling(out):
        flat = _pooled_all_to_all(send, recv_sizes, send_sizes, group, "ulysses.back")
    else:
        flat = _waited(funcol.all_to_all_single(send.view(-1), recv_sizes, send_sizes, group))
    # [N, s, B, h, Dv] -> [B, s, N, h, Dv]: the one copy on this side.
    back = flat.view(n, s, b, hn, d).permute(2, 1, 0, 3, 4).reshape(b, s, n * hn, d)
    return back.transpose(1, 2)


def _pooled_all_to_all(send: torch.Tensor, recv_sizes: list[int], send_sizes: list[int], group: Group,
              role: str) -> torch.Tensor:
    """Eager all-to-all of ``send`` (contiguous) into a pooled receive buffer; the same
    collective as ``funcol.all_to_all_single``, which would allocate the receive side itself."""
    pg = c10d._resolve_process_group(group) if isinstance(group, str) else group
    recv = scratch(role, (sum(recv_sizes),), send.dtype, send.device)
    dist.all_to_all_single(recv, send.view(-1), recv_sizes, send_sizes, group=pg)
    return recv
