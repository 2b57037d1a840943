"""The local attention kernel table: which kernel computes one block of attention, in one place.

Every strategy's runtime op (Ulysses, Ring, USP, PipeFusion's fill / stale K/V) attends through
:func:`run_kernel`, which walks ``KERNELS`` in order and runs the first whose ``accepts`` says
yes. Each kernel returns ``(out, lse)``: the output in q's dtype and the log-sum-exp (float32,
float64 for float64 inputs; ``-inf`` where no key is visible), so blocks over disjoint keys merge
exactly (``attention.merge_attention``). Layout: q [B, H, Sq, D], k/v [B, Hkv, Sk, D]; masks
bool (True = attend) or additive, broadcasting to [B, H, Sq, Sk]; GQA when H > Hkv.

Adding a kernel: one ``Kernel`` entry (before the ones it should win over). ``math`` accepts
everything and stays last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_NEG_INF = float("-inf")

Block = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """One local attention kernel: ``accepts(q, k, v, mask)`` and ``run(q, k, v, mask, scale)``."""

    name: str
    accepts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], bool]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], Block]


def _same_head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # The fused kernels want one head dim for q, k and v (SDPA allows v its own).
    return q.size(-1) == k.size(-1) == v.size(-1)


def _dead_rows(mask: torch.Tensor) -> torch.Tensor:
    """Rows (over the key dim) that may attend to no key at all, shaped like the mask minus Sk."""
    if mask.dtype == torch.bool:
        return ~mask.any(dim=-1)
    return torch.isneginf(mask).all(dim=-1)


def _empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> Block:
    # The fused kernels divide by the key count; an empty block sees nothing.
    out = q.new_zeros(q.shape[:3] + (v.size(-1),))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_full(q.shape[:3], _NEG_INF, dtype=lse_dtype)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> Block:
    """Reference attention in float32: exact, any mask, any device; O(Sq * Sk) memory."""
    if q.size(1) != k.size(1):
        repeat = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, _NEG_INF)
        else:
            scores = scores + mask.to(compute)
    lse = torch.logsumexp(scores, dim=-1)
    # A row with no visible key has lse = -inf; shifting by 0 instead keeps exp() at 0, not NaN.
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))
    out = torch.matmul(probs, v.to(compute))
    return out.to(q.dtype), lse


def _cpu_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> Block:
    """ATen's CPU flash kernel, which returns the LSE and handles GQA head ratios natively.

    It only takes additive masks of the query's dtype, and reports lse = 0 (not -inf) for rows
    whose mask is all -inf; both are corrected here.
    """
    float_mask = mask
    if mask is not None:
        if mask.dtype == torch.bool:
            zeros = torch.zeros((), dtype=q.dtype, device=q.device)
            float_mask = torch.where(mask, zeros, torch.full_like(zeros, _NEG_INF))
        else:
            float_mask = mask.to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=float_mask, scale=scale)
    if mask is not None:
        lse = torch.where(_dead_rows(mask), torch.full_like(lse, _NEG_INF), lse)
    return out, lse


def _load_flash_attn() -> Callable[..., Any] | None:
    # Resolved once at import: an import statement inside traced code would break the graph.
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except (ImportError, OSError):  # absent, or built against another CUDA/torch
        return None
    return flash_attn_func


_FLASH_ATTN_FUNC = _load_flash_attn()


def _flash_attn_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> Block:
    """The flash-attn package's kernel (unmasked fp16/bf16, GQA native)."""
    assert _FLASH_ATTN_FUNC is not None
    # flash-attn wants [B, S, H, D] and returns the LSE as [B, H, Sq] float32.
    out, lse, _ = _FLASH_ATTN_FUNC(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   softmax_scale=scale, return_attn_probs=True)
    return out.transpose(1, 2), lse


def _cuda_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> Block:
    """SDPA's CUDA flash backend (unmasked fp16/bf16, equal head counts), which returns the LSE [B, H, Sq]."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse.float()


def _cuda_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> Block:
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)
    # The kernel may pad the LSE's query dim to its tile size.
    return out, lse[:, :, : q.size(2)].float()


KERNELS: tuple[Kernel, ...] = (
    Kernel("empty", lambda q, k, v, m: k.size(2) == 0 or q.size(2) == 0, _empty),
    Kernel("cpu_flash", lambda q, k, v, m: q.device.type == "cpu" and _same_head_dim(q, k, v) and q.dtype in (
        torch.float32, torch.float64, torch.bfloat16, torch.float16), _cpu_flash_attention),
    Kernel("flash_attn", lambda q, k, v, m: _FLASH_ATTN_FUNC is not None and q.device.type == "cuda" and m is None
           and _same_head_dim(q, k, v) and q.dtype in (torch.float16, torch.bfloat16), _flash_attn_cuda),
    Kernel("cuda_flash", lambda q, k, v, m: q.device.type == "cuda" and m is None and q.size(1) == k.size(1)
           and _same_head_dim(q, k, v) and q.size(-1) <= 256 and q.size(-1) % 8 == 0
           and q.dtype in (torch.float16, torch.bfloat16), _cuda_flash),
    Kernel("cuda_efficient", lambda q, k, v, m: q.device.type == "cuda" and m is None and q.size(1) == k.size(1),
           _cuda_efficient),
    Kernel("math", lambda q, k, v, m: True, _math_attention),
)


def choose_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> Kernel:
    """The first kernel of ``KERNELS`` that accepts these inputs (``math`` accepts all)."""
    for kern in KERNELS:
        if kern.accepts(q, k, v, mask):
            return kern
    return KERNELS[-1]


def run_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> Block:
    """``(out, lse)`` of one attention block by the chosen kernel; inputs already checked."""
    return choose_kernel(q, k, v, mask).run(q, k, v, mask, scale)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """The output alone (callers that merge no blocks: PipeFusion's K/V ops), by the same table.

    ``enable_gqa`` is implied by the head counts (every kernel here reads GQA from the shapes)."""
    scale = q.size(-1) ** -0.5 if scale is None else float(scale)
    return run_kernel(q, k, v, mask, scale)[0]
