"""CPU stand-ins for flash-attn and xformers, for tests only.

Neither package runs on CPU. This module registers torch custom ops under the qualnames and
call signatures the real packages use (flash-attn >= 2.6: ``flash_attn::_flash_attn_forward``,
``flash_attn::_flash_attn_varlen_forward``; xformers' flash path: ``xformers_flash::flash_fwd``;
xformers' CUTLASS path calls ATen's ``aten::_efficient_attention_forward``, which has no CPU
kernel, so one is registered for it), each computing attention with SDPA, with fake (meta)
implementations and FLOP formulas like torch's for its attention kernels (the parity FLOP counter
counts SDPA's CPU kernel the same way), so a single-rank reference that calls a stand-in and a
per-rank program that runs SDPA are measured alike, attention included. It also builds importable modules ``flash_attn`` and
``xformers.ops`` whose public functions wrap those ops the way the real ones do (an
``autograd.Function`` around the op, padding of odd head dims, the BMHK layout).

``install()`` puts the modules into ``sys.modules`` (idempotent; registers the ops once per
process), ``uninstall()`` removes them again; ``installed()`` is the context manager. If the real
packages are importable they are left alone and nothing is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry

_REGISTERED = False
_LIBS: list[torch.library.Library] = []
_MODULE_NAMES = ("flash_attn", "flash_attn.flash_attn_interface", "xformers", "xformers.ops")


def _sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on [B, S, H, D] tensors; also the log-sum-exp [B, H, S] the kernels return.
    Fewer K/V heads (GQA) are repeated as flash-attn groups them; ``causal`` is SDPA's top-left
    mask (flash-attn aligns it bottom-right when Sq != Sk: not reproduced)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if kh.shape[1] != qh.shape[1]:
        kh, vh = (t.repeat_interleave(qh.shape[1] // t.shape[1], 1) for t in (kh, vh))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, is_causal=causal, scale=scale)
    scores = (qh.float() @ kh.float().transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.float()
    return out.transpose(1, 2).contiguous(), torch.logsumexp(scores, -1)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
            scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed [T, H, D] attention, one sequence per ``cu_seqlens`` segment."""
    outs, lses = [], []
    for i in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        o, lse = _sdpa_bshd(q[None, a:b], k[None, c:d], v[None, c:d], scale, causal)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, -1)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True

    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
        causal: bool, window_size_left: int, window_size_right: int, softcap: float,
        alibi_slopes: Optional[torch.Tensor], return_softmax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse = _sdpa_bshd(q, k, v, softmax_scale, causal)
        return out, lse, q.new_empty((0,)), torch.zeros(2, dtype=torch.int64)

    @_flash_attn_forward.register_fake
    def _(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
          alibi_slopes, return_softmax):  # type: ignore[no-untyped-def]
        b, s, h, _ = q.shape
        return (torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32), q.new_empty((0,)),
                torch.empty(2, dtype=torch.int64, device=q.device))

    @torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=())
    def _flash_attn_varlen_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
        softmax_scale: float, causal: bool, window_size_left: int = -1, window_size_right: int = -1,
        softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
        block_table: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
        seqused_k: Optional[torch.Tensor] = None, zero_tensors: bool = False, num_splits: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        return out, lse, q.new_empty((0,)), torch.zeros(2, dtype=torch.int64)

    @_flash_attn_varlen_forward.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *rest, **kw):  # type: ignore[no-untyped-def]
        t, h, _ = q.shape
        return (torch.empty_like(q), q.new_empty((h, t), dtype=torch.float32), q.new_empty((0,)),
                torch.empty(2, dtype=torch.int64, device=q.device))

    @torch.library.custom_op("xformers_flash::flash_fwd", mutates_args=())
    def _flash_fwd(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
        cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], max_seqlen_q: int,
        max_seqlen_k: int, p: float, softmax_scale: float, is_causal: bool, window_left: int,
        window_right: int, return_softmax: bool, block_tables: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if cu_seqlens_q is None:
            out, lse = _sdpa_bshd(query, key, value, softmax_scale, is_causal)
        else:
            out, lse = _varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, softmax_scale, is_causal)
        return out, lse, torch.zeros(2, dtype=torch.int64)

    @_flash_fwd.register_fake
    def _(query, key, value, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, *rest):  # type: ignore[no-untyped-def]
        if cu_seqlens_q is None:
            b, m, h, _ = query.shape
            lse_shape = [b, h, m]
        else:
            m, h, _ = query.shape
            lse_shape = [h, m]
        return (torch.empty_like(query), query.new_empty(lse_shape, dtype=torch.float32),
                torch.empty(2, dtype=torch.int64, device=query.device))

    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_efficient_attention_forward", "CPU"):
        lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - a CPU kernel for a CUDA-only op, tests only
        _LIBS.append(lib)

        def _efficient(query, key, value, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,  # type: ignore[no-untyped-def]
                       dropout_p, custom_mask_type, compute_log_sumexp=False, *, scale=None, seqlen_k=None,
                       window_size=None):
            s = scale if scale is not None else query.shape[-1] ** -0.5
            out, lse = _sdpa_bshd(query, key, value, s, custom_mask_type == 1, bias)
            z = torch.zeros((), dtype=torch.int64)
            return out, lse, z, z, query.shape[1], key.shape[1]

        lib.impl("_efficient_attention_forward", _efficient, "CPU")

    # FLOP formulas as torch has for its own attention kernels, so FLOP counts of a model that
    # calls a stand-in include its attention, as they do once it is rewritten to SDPA.
    flop_registry[torch.ops.flash_attn._flash_attn_forward] = _bshd_flops
    flop_registry[torch.ops.flash_attn._flash_attn_varlen_forward] = _thd_flops
    flop_registry[torch.ops.xformers_flash.flash_fwd] = _thd_flops


def _bshd_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> int:
    b, s_q, h, d = q.shape
    return 4 * b * h * s_q * k.shape[1] * d


def _thd_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Any = None, cu_k: Any = None,
               *_: Any, **__: Any) -> int:
    if q.dim() == 4:  # xformers' padded [B, S, H, D] form
        return _bshd_flops(q, k, v)
    if cu_q is None or cu_k is None:
        return 4 * q.shape[1] * q.shape[0] * k.shape[0] * q.shape[2]
    lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
    return sum(4 * q.shape[1] * a * b * q.shape[2] for a, b in zip(lq, lk))


# ------------------------------------------------------------------ the fake packages
class _FlashAttnFunc(torch.autograd.Function):
    """flash-attn's ``FlashAttnFunc`` forward: pad the head dim to a multiple of 8, call the op."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,  # type: ignore[no-untyped-def, override]
                deterministic, return_softmax, is_grad_enabled):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        head_size_og = q.size(3)
        if head_size_og % 8 != 0:
            q, k, v = (F.pad(t, [0, 8 - head_size_og % 8]) for t in (q, k, v))
        out_padded, softmax_lse, s_dmask, rng_state = torch.ops.flash_attn._flash_attn_forward(
            q, k, v, dropout_p, softmax_scale, causal=causal, window_size_left=window_size[0],
            window_size_right=window_size[1], softcap=softcap, alibi_slopes=alibi_slopes,
            return_softmax=return_softmax and dropout_p > 0)
        out = out_padded[..., :head_size_og]
        return out if not return_softmax else (out, softmax_lse, s_dmask)


class _FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,  # type: ignore[no-untyped-def, override]
                softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_softmax,
                block_table, is_grad_enabled):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        head_size_og = q.size(2)
        if head_size_og % 8 != 0:
            q, k, v = (F.pad(t, [0, 8 - head_size_og % 8]) for t in (q, k, v))
        out_padded, softmax_lse, s_dmask, rng_state = torch.ops.flash_attn._flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
            causal=causal, window_size_left=window_size[0], window_size_right=window_size[1], softcap=softcap,
            alibi_slopes=alibi_slopes, return_softmax=return_softmax and dropout_p > 0, block_table=block_table)
        out = out_padded[..., :head_size_og]
        return out if not return_softmax else (out, softmax_lse, s_dmask)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),  # type: ignore[no-untyped-def]
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's public function (same signature); q, k, v: [B, S, H, D]."""
    return _FlashAttnFunc.apply(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                deterministic, return_attn_probs, torch.is_grad_enabled())


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,  # type: ignore[no-untyped-def]
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's public varlen function (same signature); q, k, v: [total_tokens, H, D]."""
    return _FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                      return_attn_probs, block_table, torch.is_grad_enabled())


class LowerTriangularMask:
    """xformers' causal attention bias marker."""


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,  # type: ignore[no-untyped-def]
                               output_dtype=None):
    """xformers' public function on [B, M, H, K]: the flash op without a tensor bias, the CUTLASS
    op (ATen's ``_efficient_attention_forward``) with one, as xformers dispatches on CUDA."""
    s = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    if isinstance(attn_bias, torch.Tensor):
        out = torch.ops.aten._efficient_attention_forward(
            query, key, value, attn_bias, None, None, None, None, p, 0, False, scale=scale)[0]
        return out
    causal = isinstance(attn_bias, LowerTriangularMask)
    out, _, _ = torch.ops.xformers_flash.flash_fwd(
        query, key, value, None, None, None, query.shape[1], key.shape[1], p, s, causal, -1, -1, False, None)
    return out.reshape([*query.shape[:-1], value.shape[-1]])


# Named as flash-attn names them, so registry entries for the Python functions match the stand-ins.
flash_attn_func.__module__ = flash_attn_varlen_func.__module__ = "flash_attn.flash_attn_interface"


def _modules() -> dict[str, types.ModuleType]:
    fa = types.ModuleType("flash_attn")
    fai = types.ModuleType("flash_attn.flash_attn_interface")
    for m in (fa, fai):
        m.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
        m.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    fa.flash_attn_interface = fai  # type: ignore[attr-defined]
    fa.__version__ = "2.8.3+xdit-standin"  # type: ignore[attr-defined]
    xf = types.ModuleType("xformers")
    xops = types.ModuleType("xformers.ops")
    xops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    xops.LowerTriangularMask = LowerTriangularMask  # type: ignore[attr-defined]
    xf.ops = xops  # type: ignore[attr-defined]
    return {"flash_attn": fa, "flash_attn.flash_attn_interface": fai, "xformers": xf, "xformers.ops": xops}


def _real_installed() -> bool:
    return any(n not in sys.modules and importlib.util.find_spec(n) is not None for n in ("flash_attn", "xformers"))


def install() -> bool:
    """Register the ops and put the fake modules into ``sys.modules``; False if real packages exist."""
    if _real_installed():
        return False
    _register()
    for name, mod in _modules().items():
        sys.modules.setdefault(name, mod)
    return True


def uninstall() -> None:
    """Remove the fake modules from ``sys.modules`` (the ops stay registered in this process)."""
    for name in _MODULE_NAMES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None) is None:
            del sys.modules[name]


@contextlib.contextmanager
def installed() -> Iterator[bool]:
    """``install()`` for the duration of a ``with`` block."""
    ok = install()
    try:
        yield ok
    finally:
        if ok:
            uninstall()
