"""The backward of sequence-parallel attention (Ulysses, Ring, USP): simple and exact.

The forward is the parallel kernel itself (``runtime/attention.py``). The backward does not
reverse its communication pattern; it recomputes what this rank's queries need:

1. all-gather K and V over the sequence group, in the shards' order (USP: over the Ulysses
   group, then the ring group, which is the sequence-parallel rank order);
2. recompute attention of this rank's queries against the whole K/V in float32 (float64 for
   float64 inputs), the mask rows of those queries included, and take the exact gradients
   ``dQ``, ``dK``, ``dV`` of that block (softmax backward written out, fully masked rows give 0);
3. reduce-scatter ``dK``/``dV``: each rank's keys get the sum of every rank's contributions.

``dQ`` is then the gradient of this rank's query shard, and ``dK``/``dV`` those of its key
shards, as the gradient convention of ``runtime/autograd.py`` wants. Memory is not optimal: the
backward holds the whole K/V (the forward of Ring and USP never does) and score blocks of
[B, H, rows, Sk] in float32, the query rows taken in blocks of at most 2^26 elements; a
blockwise backward that reuses the ring and the fused kernels would do better.
A mask that requires grad is refused with ``GradientError`` at ``backward()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed._functional_collectives as funcol

from ..errors import GradientError
from . import collectives
from .collectives import Group


@dataclass(frozen=True)
class SequenceLayout:
    """Where this rank's queries and keys sit in the sequence, for the backward.

    ``levels`` lists ``(group, per-rank key lengths)`` from the innermost group out: gathering K
    over each level in turn gives the keys in mask order. ``q_rows`` is ``(offset, length)`` of
    this rank's queries in the mask's query dim, or ``None`` when the mask holds only them.
    """

    kind: str  # "ulysses", "ring" or "usp", for messages
    levels: tuple[tuple[Group, tuple[int, ...]], ...]
    q_rows: tuple[int, int] | None


def sequence_attention(
    forward: Callable[..., torch.Tensor],
    layout: SequenceLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """``forward(q, k, v, mask)``, with the backward above recorded for autograd."""
    return _SequenceAttention.apply(forward, layout, scale, enable_gqa, mask, q, k, v)


class _SequenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, forward: Callable[..., torch.Tensor], layout: SequenceLayout, scale: float | None,
                enable_gqa: bool, mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        ctx.layout, ctx.scale, ctx.gqa, ctx.has_mask = layout, scale, enable_gqa, mask is not None
        ctx.save_for_backward(q, k, v, *([mask] if mask is not None else []))
        return forward(q, k, v, mask)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        if ctx.needs_input_grad[4]:
            raise GradientError(
                f"{ctx.layout.kind}_attention: the attention mask {tuple(mask.shape)} requires grad, and "
                "the sequence-parallel attention backward has no gradient for masks; detach the mask (or "
                "compute it under torch.no_grad()), or run this attention replicated."
            )
        layout: SequenceLayout = ctx.layout
        kv = torch.stack([k, v])
        for group, sizes in layout.levels:
            kv = collectives.all_gather(kv, 3, list(sizes), group)
        if mask is not None and layout.q_rows is not None and mask.dim() >= 2 and mask.size(-2) > 1:
            mask = mask.narrow(-2, *layout.q_rows)
        dq, dk_all, dv_all = attention_backward(q, kv[0], kv[1], mask, ctx.scale, grad_out)
        dkv = torch.stack([dk_all, dv_all])
        for group, sizes in reversed(layout.levels):
            dkv = _reduce_scatter(dkv, 3, sizes, group)
        return None, None, None, None, None, dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype)


# Elements of one [B, H, rows, Sk] score block the backward materialises at a time (256 MiB in float32).
_BLOCK_ELEMENTS = 1 << 26


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of non-causal SDPA, fully masked rows giving 0 (as SDPA's output).

    Queries go in blocks of rows so that a score block stays under ``_BLOCK_ELEMENTS``; dk and dv
    add up over the blocks. ``dk``/``dv`` come back in the compute dtype (float32 or float64).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    heads, kv_heads = q.size(1), k.size(1)
    repeat = heads // kv_heads
    kc, vc = k.to(compute), v.to(compute)
    if repeat > 1:
        kc, vc = kc.repeat_interleave(repeat, dim=1), vc.repeat_interleave(repeat, dim=1)
    rows = q.size(2)
    step = max(1, min(rows, _BLOCK_ELEMENTS // max(1, q.size(0) * heads * k.size(2))))
    dqs, dk, dv = [], None, None
    for start in range(0, rows, step):
        length = min(step, rows - start)
        m = mask
        if mask is not None and mask.dim() >= 2 and mask.size(-2) > 1:
            m = mask.narrow(-2, start, length)
        dq_b, dk_b, dv_b = _block_backward(q.narrow(2, start, length).to(compute), kc, vc, m, scale,
                                           grad_out.narrow(2, start, length).to(compute))
        dqs.append(dq_b)
        dk = dk_b if dk is None else dk + dk_b
        dv = dv_b if dv is None else dv + dv_b
    if dk is None or dv is None:  # no query rows: nothing flows back
        return torch.zeros_like(q), torch.zeros_like(k, dtype=compute), torch.zeros_like(v, dtype=compute)
    if repeat > 1:
        dk = dk.unflatten(1, (kv_heads, repeat)).sum(2)
        dv = dv.unflatten(1, (kv_heads, repeat)).sum(2)
    dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=2)
    return dq.to(q.dtype), dk, dv


def _block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    go: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax-attention backward of one block of query rows, written out (k, v have q's heads)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - lse)  # a row with no visible key is all 0
    out = torch.matmul(probs, v)
    dv = torch.matmul(probs.transpose(-1, -2), go)
    dprobs = torch.matmul(go, v.transpose(-1, -2))
    dscores = probs * (dprobs - (go * out).sum(-1, keepdim=True))
    dq = torch.matmul(dscores, k) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q) * scale
    return dq, dk, dv


def _reduce_scatter(x: torch.Tensor, dim: int, sizes: Sequence[int], group: Group) -> torch.Tensor:
    """Sum of ``x`` over ``group``, of which this rank keeps its piece along ``dim`` (lengths ``sizes``).

    Uneven pieces are padded to the longest so that one ``reduce_scatter_tensor`` does it.
    """
    me = collectives.group_rank(group)
    longest = max(sizes)
    moved = x.movedim(dim, 0)
    if any(s != longest for s in sizes):
        parts, offset = [], 0
        for s in sizes:
            part = moved.narrow(0, offset, s)
            offset += s
            if s < longest:
                part = torch.cat([part, part.new_zeros((longest - s, *part.shape[1:]))])
            parts.append(part)
        moved = torch.cat(parts)
    out = funcol.reduce_scatter_single(moved.contiguous(), "sum", 0, group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out.narrow(0, 0, sizes[me]).movedim(0, dim)
