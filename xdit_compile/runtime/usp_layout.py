"""USP's ring without K/V copies: the Ulysses all-to-all's receive buffer is the ring's K/V block.

Before, USP scattered q, k and v in one all-to-all (``ulysses_layout.scatter_heads``, receive
buffer ``[S, 3, B, H/U, D]``) and its ring then stacked k and v into a fresh
``[2, B, H/U, S, D]`` block: a ring pass sends one contiguous buffer, and k/v sat interleaved
with q, position by position. Pure Ring has no such copy (its one ``torch.stack`` builds the send
buffer from the projections' outputs, like Ulysses' own send buffer).

Now, when the ring has more than one rank, q travels in its own all-to-all and k, v in a second
one (:func:`scatter_kv`): the same bytes in two collectives instead of one. Its receive buffer,
``[S, 2, B, H/U, D]`` with the Ulysses shards already concatenated along the sequence, is
contiguous, so it *is* the ring's first K/V block: ``collectives.shift`` sends it as it is and
receives the next block in the same layout, and the kernel reads each block's k and v as strided
``[B, H/U, S, D]`` views (:func:`unpack_kv`). Only uneven ring chunks still copy, to pad every
block to one shape (:func:`pad_kv`), as pure Ring pads too.

Copies per USP attention call (``tests/runtime/test_usp_kv.py`` counts them): 3 before (the send
buffer of the heads-out all-to-all, the ring's K/V stack, the heads-back copy into
``[B, s, H, D]``), 2 now. Results are bit-identical; bytes handed to the network are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xdit_compile.runtime.collectives import Group, _record, _waited, funcol, group_size

__all__ = ["pad_kv", "scatter_kv", "unpack_kv"]


def scatter_kv(k: torch.Tensor, v: torch.Tensor, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    """k, v sequence shards [B, H, sizes[r], D] -> one contiguous ``[sum(sizes), 2, B, H/N, D]``
    block holding this rank's 1/N of the heads over the whole sequence (heads ``r * H/N`` on).

    The layout of ``ulysses_layout.scatter_heads`` for T = 2, returned as the receive buffer
    itself rather than as views of it.
    """
    n = group_size(group)
    b, h, s, d = k.shape
    hn = h // n
    # [B, N, h, s, D] -> [N, s, B, h, D] is a view; the stack at dim 2 is the only copy.
    send = torch.stack([x.view(b, n, hn, s, d).permute(1, 3, 0, 2, 4) for x in (k, v)], dim=2)
    per_position = 2 * b * hn * d
    _record("all_to_all", send, n)
    flat = _waited(funcol.all_to_all_single(
        send.view(-1), [sizes[j] * per_position for j in range(n)], [s * per_position] * n, group))
    return flat.view(sum(sizes), 2, b, hn, d)


def pad_kv(kv: torch.Tensor, length: int) -> torch.Tensor:
    """``kv`` [S, 2, B, h, D] padded with zeros to ``length`` positions (the same tensor if long enough)."""
    if kv.size(0) >= length:
        return kv
    return torch.cat([kv, kv.new_zeros((length - kv.size(0), *kv.shape[1:]))])


def unpack_kv(kv: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` positions of a ``[S, 2, B, h, D]`` block as k, v [B, h, length, D] views."""
    block = kv.narrow(0, 0, length)
    return block[:, 0].permute(1, 2, 0, 3), block[:, 1].permute(1, 2, 0, 3)
