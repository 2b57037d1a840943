"""Tiny DiT-style models whose attention reaches the graph as ONE opaque call.

Each model: a conv patch embedding (k = s = 2) of a latent [B, 4, 16, 16] into 64 tokens of
width 64 (4 heads x 16), a learned position table, adaLN-style modulation from a conditioning
vector, a self-attention and a cross-attention to 8 text tokens (the last sample's last 3 text
tokens are padding), an MLP, and an unpatchify back to [B, 4, 16, 16]. Only the attention call
differs:

    mha_batch_first    nn.MultiheadAttention(batch_first=True); cross-attention with a boolean
                       key_padding_mask
    mha_seq_first      nn.MultiheadAttention(batch_first=False) on [S, B, D]; self-attention with a
                       float attn_mask [S, S] (a relative-position bias), cross-attention with kdim /
                       vdim != embed_dim (separate projection weights) and a float key_padding_mask
    flash_attn         flash_attn_func on [B, S, H, D]; cross-attention too
    flash_attn_varlen  flash_attn_varlen_func on packed [B*S, H, D] tokens with cu_seqlens built
                       in the graph (one sequence per sample)
    flash_attn_varlen_ragged  the packed self-attention holds two sequences of different lengths
                       (cannot be sharded: runs replicated, with the reason in the report)
    xformers           memory_efficient_attention on [B, S, H, D]; cross-attention with a tensor
                       attn_bias [B, H, S, T] built from the text mask

The flash-attn / xformers calls go through CPU stand-ins registered under the real packages' op
names (``xdit_compile.testing.kernel_standins``), installed by ``make``. No model here copies
any codebase. ``make(name, batch=2, seed=0) -> (model.eval(), inputs)``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from xdit_compile.testing import kernel_standins

DIM, HEADS, TEXT, TEXT_DIM, PATCH, CH, SIDE = 64, 4, 8, 32, 2, 4, 16
NAMES = ["mha_batch_first", "mha_seq_first", "flash_attn", "flash_attn_varlen", "xformers", "flash_attn_varlen_ragged"]


class _MHA(nn.Module):
    """nn.MultiheadAttention, batch-first or sequence-first (tokens transposed around it)."""

    def __init__(self, batch_first: bool, kdim: int | None = None, self_mask: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.self_attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.to_text = nn.Identity() if kdim else nn.Linear(TEXT_DIM, DIM)
        n = (SIDE // PATCH) ** 2
        self.rel = nn.Parameter(torch.randn(n, n) * 0.1) if self_mask else None

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        x = h if self.batch_first else h.transpose(0, 1)
        return self.self_attn(x, x, x, attn_mask=self.rel, need_weights=False)[0] if self.rel is not None else \
            self.self_attn(x, x, x, need_weights=False)[0]

    def forward(self, h: torch.Tensor, text: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attend(h)
        t = self.to_text(text)
        q, t = (h, t) if self.batch_first else (h.transpose(0, 1), t.transpose(0, 1))
        if self.rel is None:
            pad = ~keep
        else:  # a float key_padding_mask of the query's dtype
            pad = torch.zeros_like(keep, dtype=h.dtype).masked_fill(~keep, -1e4)
        c = self.cross(q, t, t, key_padding_mask=pad, need_weights=False)[0]
        if not self.batch_first:
            a, c = a.transpose(0, 1), c.transpose(0, 1)
        return a, c


class _Kernel(nn.Module):
    """q, k, v projections in [B, S, H, D] and one kernel call per attention."""

    def __init__(self, kind: str, fns: dict[str, Callable[..., Any]]) -> None:
        super().__init__()
        self.kind, self.fns = kind, fns
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(TEXT_DIM, 2 * DIM)
        self.o_self = nn.Linear(DIM, DIM)
        self.o_cross = nn.Linear(DIM, DIM)

    def forward(self, h: torch.Tensor, text: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, HEADS, DIM // HEADS).unbind(2)
        cq = self.q(h).view(b, s, HEADS, DIM // HEADS)
        ck, cv = self.kv(text).view(b, TEXT, 2, HEADS, DIM // HEADS).unbind(2)
        if self.kind == "flash_attn":
            a = self.fns["flash_attn_func"](q, k, v)
            c = self.fns["flash_attn_func"](cq, ck, cv, softmax_scale=0.3)
        elif self.kind == "flash_attn_varlen_ragged":  # two packed sequences of different lengths
            cu = torch.tensor([0, s // 2, b * s], dtype=torch.int32, device=h.device)
            a = self.fns["flash_attn_varlen_func"](q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu,
                                                   b * s - s // 2, b * s - s // 2)
            a = a.view(b, s, HEADS, DIM // HEADS)
            c = self.fns["flash_attn_func"](cq, ck, cv)
        elif self.kind == "flash_attn_varlen":
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=h.device)
            cu_t = torch.arange(0, (b + 1) * TEXT, TEXT, dtype=torch.int32, device=h.device)
            a = self.fns["flash_attn_varlen_func"](q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, s, s)
            a = a.view(b, s, HEADS, DIM // HEADS)
            c = self.fns["flash_attn_varlen_func"](cq.flatten(0, 1), ck.flatten(0, 1), cv.flatten(0, 1), cu, cu_t, s, TEXT)
            c = c.view(b, s, HEADS, DIM // HEADS)
        else:
            a = self.fns["memory_efficient_attention"](q, k, v)
            bias = (1.0 - keep.to(h.dtype)) * -1e4
            bias = bias[:, None, None, :].expand(b, HEADS, s, TEXT)
            c = self.fns["memory_efficient_attention"](cq, ck, cv, attn_bias=bias)
        return self.o_self(a.reshape(b, s, DIM)), self.o_cross(c.reshape(b, s, DIM))


class KernelDiT(nn.Module):
    """One DiT block around the chosen attention; ``forward(latent, cond, text, text_keep)``."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        n = (SIDE // PATCH) ** 2
        self.embed = nn.Conv2d(CH, DIM, PATCH, stride=PATCH)
        self.pos = nn.Parameter(torch.randn(1, n, DIM) * 0.02)
        self.ada = nn.Linear(DIM, 4 * DIM)
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(approximate="tanh"), nn.Linear(4 * DIM, DIM))
        self.out = nn.Linear(DIM, PATCH * PATCH * CH)

    def forward(self, latent: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, text_keep: torch.Tensor,
                return_dict: bool = True) -> Any:
        b = latent.shape[0]
        h = self.embed(latent).flatten(2).transpose(1, 2) + self.pos
        shift, scale, gate, gate2 = self.ada(F.silu(cond))[:, None].chunk(4, dim=-1)
        x = self.norm1(h) * (1 + scale) + shift
        a, c = self.attention(x, text, text_keep)
        h = h + gate * a + c
        h = h + gate2 * self.mlp(self.norm2(h))
        g = SIDE // PATCH
        out = self.out(h).view(b, g, g, PATCH, PATCH, CH).permute(0, 5, 1, 3, 2, 4).reshape(b, CH, SIDE, SIDE)
        return (out,) if not return_dict else {"sample": out}


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """``(model.eval(), inputs)`` for one of ``NAMES``, deterministic from ``seed``."""
    if name not in NAMES:
        raise ValueError(f"unknown kernel model {name!r}; known: {NAMES}")
    kernel_standins.install()
    fns = {"flash_attn_func": sys.modules["flash_attn"].flash_attn_func,
           "flash_attn_varlen_func": sys.modules["flash_attn"].flash_attn_varlen_func,
           "memory_efficient_attention": sys.modules["xformers.ops"].memory_efficient_attention}
    torch.manual_seed(seed)
    if name.startswith("mha"):
        # Eager nn.MultiheadAttention takes a fused fast path (``_native_multi_head_attention``)
        # that FLOP counters do not see, so the single-rank reference would count too few FLOPs.
        # Dynamo never takes it; with it off, eager runs what the graph holds.
        torch.backends.mha.set_fastpath_enabled(False)
    if name == "mha_batch_first":
        attention: nn.Module = _MHA(batch_first=True)
    elif name == "mha_seq_first":
        attention = _MHA(batch_first=False, kdim=TEXT_DIM, self_mask=True)
    else:
        attention = _Kernel(name, fns)
    model = KernelDiT(attention).eval()
    keep = torch.ones(batch, TEXT, dtype=torch.bool)
    keep[-1, -3:] = False
    inputs = {"latent": torch.randn(batch, CH, SIDE, SIDE), "cond": torch.randn(batch, DIM),
              "text": torch.randn(batch, TEXT, TEXT_DIM), "text_keep": keep}
    return model, inputs
