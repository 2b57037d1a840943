"""Attention kernels that return the log-sum-exp, and sequence-parallel attention built on them.

Layout everywhere: ``q_BHSD`` is [B, H, Sq, D], ``k``/``v`` are [B, Hkv, Sk, D] with ``Hkv == H``
unless ``enable_gqa`` (then ``H % Hkv == 0`` and query head h reads key/value head
``h // (H // Hkv)``, as in ``F.scaled_dot_product_attention``). Masks broadcast to
[B, H, Sq, Sk] and are either bool (True = attend) or additive float. Attention is never causal
here: the compiler does not lower causal attention.

The log-sum-exp (``lse``, natural log, float32) of a block of keys is what lets blocks over
disjoint key sets be merged exactly (:func:`merge_attention`). A query row that sees no key at
all has ``lse = -inf`` and output 0, and merging treats such a block as absent.

Sequence parallelism, with N ranks each holding a contiguous shard of the sequence:

* :func:`ulysses_attention` trades the sequence shard for a head shard with one all-to-all,
  attends over the whole sequence, and trades back.
* :func:`ring_attention` keeps the queries and passes K/V blocks around the ring.
* :func:`usp_attention` nests the two: Ulysses inside a ring.

Only shapes, dtypes and the (Python int) shard sizes steer the code, never tensor values, so all
of it can run inside graphs traced by Dynamo and compiled by inductor.

All three are differentiable (``runtime/attention_grad.py``): when autograd records them, the
backward all-gathers K/V, recomputes this rank's queries' attention and reduce-scatters dK/dV.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from xdit_compile.errors import XditError
from xdit_compile.runtime.attention_grad import SequenceLayout, sequence_attention
from xdit_compile.runtime.autograd import differentiable, recording
from xdit_compile.runtime.collectives import Group, group_rank, group_size, shift, wait
from xdit_compile.runtime.kernels import _math_attention, run_kernel  # noqa: F401  (_math_attention: tests)
from xdit_compile.runtime.ulysses_layout import gather_heads, scatter_heads
from xdit_compile.runtime.usp_layout import pad_kv, scatter_kv, unpack_kv

__all__ = [
    "AttentionError",
    "attention_with_lse",
    "merge_attention",
    "ring_attention",
    "ulysses_attention",
    "usp_attention",
]

_NEG_INF = float("-inf")


class AttentionError(XditError, ValueError):
    """Attention inputs whose shapes, masks or shard sizes cannot work together."""


# --------------------------------------------------------------------------------------------
# Single-device blocks


def _check_heads(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttentionError(
            f"{fn}: expected 4-D [B, H, S, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}."
        )
    if k.shape != v.shape:
        raise AttentionError(f"{fn}: k {tuple(k.shape)} and v {tuple(v.shape)} must match.")
    heads, kv_heads = q.size(1), k.size(1)
    if heads != kv_heads and not (gqa and kv_heads > 0 and heads % kv_heads == 0):
        raise AttentionError(
            f"{fn}: q has {heads} heads and k/v {kv_heads}; pass enable_gqa=True when the query "
            "heads are a multiple of the key/value heads."
        )


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal scaled dot-product attention that also returns the log-sum-exp.

    Returns ``out`` [B, H, Sq, D] in q's dtype, equal to ``F.scaled_dot_product_attention``
    (fully masked rows give 0), and ``lse`` [B, H, Sq] in float32 (float64 for float64 inputs):
    ``logsumexp(scale * q @ k^T + mask)`` over the keys, ``-inf`` where no key is visible.

    Kernel choice: the table of ``runtime/kernels.py`` (on CPU ATen's flash kernel; on CUDA the
    flash-attn package when installed and there is no mask, else ATen's memory-efficient kernel
    when there is no mask; everything else uses an exact float32 math path).
    """
    _check_heads("attention_with_lse", q, k, v, enable_gqa)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    return run_kernel(q, k, v, mask, scale)


def merge_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    ``out = (exp(lse_a) * out_a + exp(lse_b) * out_b) / exp(lse)`` with
    ``lse = logaddexp(lse_a, lse_b)``, computed in the LSE's precision. A block whose row has
    ``lse = -inf`` (no visible key) contributes nothing, even if its output row holds NaN; a row
    that neither block sees stays 0 with ``lse = -inf``. ``out`` has the promoted dtype of the
    two outputs.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - safe_lse).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe_lse).unsqueeze(-1)
    dead_a = torch.isneginf(lse_a).unsqueeze(-1)
    dead_b = torch.isneginf(lse_b).unsqueeze(-1)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    # where() rather than multiply: 0 * NaN would leak an invalid block into the result.
    part_a = torch.where(dead_a, zero, weight_a * out_a.to(lse.dtype))
    part_b = torch.where(dead_b, zero, weight_b * out_b.to(lse.dtype))
    out_dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    return (part_a + part_b).to(out_dtype), lse


# --------------------------------------------------------------------------------------------
# Sequence parallel


def _check_divisible(fn: str, what: str, count: int, ranks: int) -> None:
    if count % ranks != 0:
        raise AttentionError(
            f"{fn}: {what} = {count} is not divisible by the Ulysses degree {ranks}; choose a "
            "Ulysses degree that divides the head counts (or use ring attention)."
        )


def _check_shard(fn: str, what: str, tensor: torch.Tensor, sizes: Sequence[int], index: int,
                 ranks: int) -> None:
    if len(sizes) != ranks:
        raise AttentionError(
            f"{fn}: {what} sizes {list(sizes)} have {len(sizes)} entries for {ranks} ranks."
        )
    if tensor.size(2) != sizes[index]:
        raise AttentionError(
            f"{fn}: this rank (index {index} of {ranks}) holds {what} {tuple(tensor.shape)} with "
            f"{tensor.size(2)} positions but the sizes say {sizes[index]} ({list(sizes)})."
        )


def _mask_heads(
    mask: torch.Tensor | None, heads: int, index: int, ranks: int
) -> torch.Tensor | None:
    """This rank's slice of a mask's head dim after heads were split into ``ranks`` groups."""
    if mask is None or mask.dim() < 3 or mask.size(-3) != heads or ranks == 1:
        return mask
    per_rank = heads // ranks
    return mask.narrow(-3, index * per_rank, per_rank)


def _check_mask(fn: str, mask: torch.Tensor | None, heads: int, queries: int, keys: int) -> None:
    if mask is None:
        return
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if mask.dim() > 4 or shape[1] not in (1, heads) or shape[2] not in (1, queries) or \
            shape[3] not in (1, keys):
        raise AttentionError(
            f"{fn}: mask {tuple(mask.shape)} must broadcast to [B, {heads} or 1, {queries} or 1, "
            f"{keys} or 1] (heads, queries and keys in gathered order)."
        )


def _ulysses_scatter_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    q_sizes: Sequence[int],
    kv_sizes: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence shards with all heads -> whole sequence with 1/N of the heads, for q, k and v.

    Tensors with the same shape and sizes travel in one all-to-all (k and v always do; q joins
    them for self-attention), since each collective has a fixed latency cost.
    """
    # One copy into the send buffer, none out of the receive buffer (runtime/ulysses_layout.py).
    if q.shape == k.shape and list(q_sizes) == list(kv_sizes):
        q, k, v = scatter_heads((q, k, v), group, q_sizes)
        return q, k, v
    (q,) = scatter_heads((q,), group, q_sizes)
    k, v = scatter_heads((k, v), group, kv_sizes)
    return q, k, v


@differentiable
def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group,
    q_sizes: Sequence[int],
    kv_sizes: Sequence[int],
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """DeepSpeed-Ulysses attention over a sequence sharded across ``group``.

    ``q`` is this rank's shard [B, H, q_sizes[r], D] and ``k``/``v`` [B, Hkv, kv_sizes[r], D],
    where r is this rank's index in ``group`` and the shards concatenate in group-rank order.
    H and Hkv must be divisible by the group size N. ``mask`` is aligned with the gathered
    sequence: query dim sum(q_sizes) or 1, key dim sum(kv_sizes) or 1, head dim H or 1 (this
    rank takes its own head slice). Returns this rank's output shard [B, H, q_sizes[r], D].
    """
    fn = "ulysses_attention"
    _check_heads(fn, q, k, v, enable_gqa)
    ranks, index = group_size(group), group_rank(group)
    _check_divisible(fn, "query heads", q.size(1), ranks)
    _check_divisible(fn, "key/value heads", k.size(1), ranks)
    _check_shard(fn, "q", q, q_sizes, index, ranks)
    _check_shard(fn, "k/v", k, kv_sizes, index, ranks)
    _check_mask(fn, mask, q.size(1), sum(q_sizes), sum(kv_sizes))
    if recording(q, k, v):
        layout = SequenceLayout("ulysses", ((group, tuple(kv_sizes)),), (sum(q_sizes[:index]), q_sizes[index]))
        return sequence_attention(
            lambda q, k, v, mask: _ulysses(q, k, v, group, q_sizes, kv_sizes, mask, scale, enable_gqa, index, ranks),
            layout, q, k, v, mask, scale, enable_gqa)
    return _ulysses(q, k, v, group, q_sizes, kv_sizes, mask, scale, enable_gqa, index, ranks)


def _ulysses(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    q_sizes: Sequence[int],
    kv_sizes: Sequence[int],
    mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
    index: int,
    ranks: int,
) -> torch.Tensor:
    """Ulysses attention body; inputs already validated."""
    heads = q.size(1)
    q, k, v = _ulysses_scatter_heads(q, k, v, group, q_sizes, kv_sizes)
    out, _ = attention_with_lse(q, k, v, _mask_heads(mask, heads, index, ranks), scale, enable_gqa)
    return gather_heads(out, group, q_sizes)


def _block_mask(mask: torch.Tensor | None, offset: int, length: int) -> torch.Tensor | None:
    """The key columns of ``mask`` that belong to one ring block (a key dim of 1 broadcasts)."""
    if mask is None or mask.size(-1) == 1:
        return mask
    return mask.narrow(-1, offset, length)


def _ring(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    kv_sizes: Sequence[int],
    mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """Ring attention body; inputs already validated, ``mask`` already sliced to q's heads."""
    padded = max(kv_sizes)
    kv = torch.stack([k, v])
    if kv.size(3) < padded:
        pad_shape = list(kv.shape)
        pad_shape[3] = padded - kv.size(3)
        kv = torch.cat([kv, kv.new_zeros(pad_shape)], dim=3)
    return _ring_blocks(q, kv, _unpack_stacked, v.size(-1), group, kv_sizes, mask, scale, enable_gqa)


def _unpack_stacked(kv: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Pure Ring's block: k and v stacked heads-major, [2, B, H, S, D].
    return kv[0].narrow(2, 0, length), kv[1].narrow(2, 0, length)


def _ring_blocks(
    q: torch.Tensor,
    kv: torch.Tensor,
    unpack: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    v_dim: int,
    group: Group,
    kv_sizes: Sequence[int],
    mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """The ring loop over a K/V block ``kv`` in any layout: ``unpack(kv, n)`` gives the block's first
    n positions as k, v [B, H, n, D]; every rank's ``kv`` has one shape (padded to max(kv_sizes))."""
    ranks, index = group_size(group), group_rank(group)
    offsets = [sum(kv_sizes[:i]) for i in range(ranks)]
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for step in range(ranks):
        # After `step` passes this rank holds the block that started on rank index - step.
        source = (index - step) % ranks
        # Issue the next pass before computing and wait for it after (double buffering): the
        # network fills `incoming` while this block is attended, eagerly and in compiled graphs.
        incoming = shift(kv, 1, group, wait=False) if step + 1 < ranks else None
        length = kv_sizes[source]
        if length > 0:
            # Padding is cut off rather than masked: the sizes are static, and an unmasked
            # block keeps the fast kernels available.
            block_out, block_lse = attention_with_lse(
                q, *unpack(kv, length), _block_mask(mask, offsets[source], length), scale, enable_gqa,
            )
            if out is None or lse is None:
                out, lse = block_out.to(block_lse.dtype), block_lse
            else:
                out, lse = merge_attention(out, lse, block_out, block_lse)
        if incoming is not None:
            kv = wait(incoming)
    if out is None:
        return q.new_zeros(q.shape[:3] + (v_dim,))
    return out.to(q.dtype)


@differentiable
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group,
    kv_sizes: Sequence[int],
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Ring attention: local queries attend to every rank's K/V block as it passes by.

    ``q`` is [B, H, Sq_local, D] (any local length); ``k``/``v`` are this rank's key shard
    [B, Hkv, kv_sizes[r], D], shards concatenating in group-rank order. K/V blocks are padded to
    max(kv_sizes) so every pass has one shape, travel N - 1 steps with :func:`shift`, and the
    per-block results are merged with their LSE (accumulated in float32); each block's padding is
    sliced off before attending. ``mask``: query dim
    Sq_local or 1, key dim sum(kv_sizes) (gathered order) or 1, head dim H or 1.
    Returns [B, H, Sq_local, D].
    """
    fn = "ring_attention"
    _check_heads(fn, q, k, v, enable_gqa)
    ranks, index = group_size(group), group_rank(group)
    _check_shard(fn, "k/v", k, kv_sizes, index, ranks)
    _check_mask(fn, mask, q.size(1), q.size(2), sum(kv_sizes))
    if recording(q, k, v):
        return sequence_attention(
            lambda q, k, v, mask: _ring(q, k, v, group, kv_sizes, mask, scale, enable_gqa),
            SequenceLayout("ring", ((group, tuple(kv_sizes)),), None), q, k, v, mask, scale, enable_gqa)
    return _ring(q, k, v, group, kv_sizes, mask, scale, enable_gqa)


@differentiable
def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ulysses_group: Group,
    ring_group: Group,
    q_sizes: Sequence[int],
    kv_sizes: Sequence[int],
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Unified sequence parallelism: Ulysses inside each ring chunk, ring across chunks.

    The sequence is sharded over R * U ranks; this rank's sequence-parallel index is
    ``ring_index * U + ulysses_index``, where ``ulysses_index`` is its rank in
    ``ulysses_group`` (size U) and ``ring_index`` its rank in ``ring_group`` (size R).
    ``q_sizes``/``kv_sizes`` list all R * U shard lengths in that order, so ring chunk r is the
    concatenation of shards r*U .. r*U + U - 1. The Ulysses all-to-all gathers this ring
    index's U shards (splitting heads U ways), ring attention runs over the R chunks, and the
    all-to-all goes back. ``mask``: query dim = the gathered queries of this ring index
    (sum(q_sizes[r*U:(r+1)*U])) or 1, key dim = sum(kv_sizes) in full order or 1, heads H or 1.
    Returns [B, H, q_sizes[sp_index], D].
    """
    fn = "usp_attention"
    _check_heads(fn, q, k, v, enable_gqa)
    ulysses, u_index = group_size(ulysses_group), group_rank(ulysses_group)
    ring, r_index = group_size(ring_group), group_rank(ring_group)
    sp_index = r_index * ulysses + u_index
    _check_divisible(fn, "query heads", q.size(1), ulysses)
    _check_divisible(fn, "key/value heads", k.size(1), ulysses)
    _check_shard(fn, "q", q, q_sizes, sp_index, ring * ulysses)
    _check_shard(fn, "k/v", k, kv_sizes, sp_index, ring * ulysses)
    chunk = slice(r_index * ulysses, (r_index + 1) * ulysses)
    local_q_sizes, local_kv_sizes = list(q_sizes[chunk]), list(kv_sizes[chunk])
    _check_mask(fn, mask, q.size(1), sum(local_q_sizes), sum(kv_sizes))
    ring_kv_sizes = [sum(kv_sizes[r * ulysses:(r + 1) * ulysses]) for r in range(ring)]

    def body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        heads = q.size(1)
        mask = _mask_heads(mask, heads, u_index, ulysses)
        if ring > 1:
            # q and k/v in two all-to-alls: k/v's receive buffer is the ring's first block (no copy).
            (q,) = scatter_heads((q,), ulysses_group, local_q_sizes)
            kv = pad_kv(scatter_kv(k, v, ulysses_group, local_kv_sizes), max(ring_kv_sizes))
            out = _ring_blocks(q, kv, unpack_kv, v.size(-1), ring_group, ring_kv_sizes, mask, scale, enable_gqa)
        else:
            q, k, v = _ulysses_scatter_heads(q, k, v, ulysses_group, local_q_sizes, local_kv_sizes)
            out = _ring(q, k, v, ring_group, ring_kv_sizes, mask, scale, enable_gqa)
        return gather_heads(out, ulysses_group, local_q_sizes)

    if recording(q, k, v):
        # Keys in mask order: this ring index's Ulysses shards, then the ring chunks.
        levels = ((ulysses_group, tuple(local_kv_sizes)), (ring_group, tuple(ring_kv_sizes)))
        layout = SequenceLayout("usp", levels, (sum(local_q_sizes[:u_index]), q_sizes[sp_index]))
        return sequence_attention(body, layout, q, k, v, mask, scale, enable_gqa)
    return body(q, k, v, mask)
