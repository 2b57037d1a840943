"""One tiny DiT whose attention is written out in the ways research code writes it.

``make(form)`` builds the same weights for every form, so the ``"sdpa"`` form is the hand-written
baseline the others are measured against (bytes moved, FLOPs, output):

    form        self-attention                                   cross-attention (key padding)
    sdpa        F.scaled_dot_product_attention                    SDPA with a boolean mask
    matmul      (q @ k.transpose(-2, -1)) * scale, softmax, @ v   additive float mask
    einsum      heads folded into the batch, einsum, softmax     masked_fill(~keep, -inf)
    baddbmm     baddbmm(empty, q, k^T, beta=0, alpha=scale), bmm  baddbmm(bias, ..., beta=1)
    inplace     einsum, then sim.masked_fill_(~keep, -max)       the same, in place
    fp32        matmul with the scale on q, float32 softmax      additive mask, float32 softmax

The block is adaLN-modulated (timestep), with a patch-embedding convolution in and a linear
unpatchify out, so PipeFusion can stage it and the sequence axis can split its patches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("sdpa", "matmul", "einsum", "baddbmm", "inplace", "fp32")


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)  # [B, H, N, D]


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attend(form: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Attention over [B, H, N, D] q/k/v; ``keep`` a [B, Nk] key mask (True: attend) or None."""
    b, h, n, d = q.shape
    scale = d ** -0.5
    if form == "sdpa":
        mask = None if keep is None else keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if form in ("matmul", "fp32"):
        if form == "fp32":
            s = (q * scale) @ k.transpose(-2, -1)
        else:
            s = (q @ k.transpose(-2, -1)) * scale
        if keep is not None:
            s = s + torch.zeros_like(keep, dtype=q.dtype).masked_fill(~keep, float("-inf"))[:, None, None, :]
        p = s.float().softmax(-1).to(q.dtype) if form == "fp32" else s.softmax(dim=-1)
        return p @ v
    qf, kf, vf = (t.reshape(b * h, -1, d) for t in (q, k, v))
    keep_f = None if keep is None else keep.repeat_interleave(h, dim=0)[:, None, :]  # [B*H, 1, Nk]
    if form == "einsum":
        sim = torch.einsum("b i d, b j d -> b i j", qf, kf) * scale
        if keep_f is not None:
            sim = sim.masked_fill(~keep_f, float("-inf"))
        o = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), vf)
    elif form == "inplace":
        sim = torch.einsum("b i d, b j d -> b i j", qf, kf) * scale
        if keep_f is not None:
            sim.masked_fill_(~keep_f, -torch.finfo(sim.dtype).max)
        o = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), vf)
    elif form == "baddbmm":
        if keep_f is None:
            base = torch.empty(qf.shape[0], qf.shape[1], kf.shape[1], dtype=q.dtype)
            s = torch.baddbmm(base, qf, kf.transpose(-1, -2), beta=0, alpha=scale)
        else:
            bias = torch.zeros(keep_f.shape, dtype=q.dtype).masked_fill(~keep_f, float("-inf"))
            s = torch.baddbmm(bias.expand(-1, qf.shape[1], -1), qf, kf.transpose(-1, -2), beta=1, alpha=scale)
        o = torch.bmm(s.softmax(dim=-1), vf)
    else:
        raise ValueError(f"unknown attention form {form!r}; one of {FORMS}")
    return o.reshape(b, h, n, d)


class SpelledBlock(nn.Module):
    def __init__(self, form: str, dim: int, heads: int, ctx_dim: int) -> None:
        super().__init__()
        self.form, self.heads = form, heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.q2 = nn.Linear(dim, dim)
        self.kv2 = nn.Linear(ctx_dim, 2 * dim)
        self.proj2 = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(t))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = (_heads(z, self.heads) for z in self.qkv(h).chunk(3, dim=-1))
        x = x + g1 * self.proj(_merge(attend(self.form, q, k, v, None)))
        q = _heads(self.q2(self.norm2(x)), self.heads)
        k, v = (_heads(z, self.heads) for z in self.kv2(ctx).chunk(2, dim=-1))
        x = x + self.proj2(_merge(attend(self.form, q, k, v, keep)))
        return x + g2 * self.mlp(self.norm3(x) * (1 + sc2) + sh2)


class SpelledDiT(nn.Module):
    """A small DiT with conv patch embedding, adaLN blocks, self + cross attention, unpatchify."""

    def __init__(self, form: str = "matmul", in_ch: int = 4, dim: int = 64, heads: int = 4, depth: int = 2,
                 patch: int = 2, ctx_dim: int = 32) -> None:
        super().__init__()
        self.patch, self.in_ch = patch, in_ch
        self.embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(SpelledBlock(form, dim, heads, ctx_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, patch * patch * in_ch)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True) -> Any:
        b, c, hh, ww = hidden_states.shape
        p = self.patch
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)  # [B, N, dim]
        freqs = torch.exp(-math.log(10000.0) * torch.arange(32, dtype=torch.float32) / 32)
        args = timestep.float()[:, None] * freqs[None]
        t = self.t_mlp(torch.cat([args.cos(), args.sin()], dim=-1))
        keep = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        for block in self.blocks:
            x = block(x, t, encoder_hidden_states, keep)
        x = self.out(self.norm(x))  # [B, N, p*p*C]
        x = x.reshape(b, hh // p, ww // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hh, ww)
        return (x,) if not return_dict else {"sample": x}


def make(name: str, batch: int = 2, seed: int = 0, size: int = 16) -> tuple[nn.Module, dict[str, Any]]:
    """``SpelledDiT`` with attention spelled as ``name`` (one of ``FORMS``), same weights for every form."""
    if name not in FORMS:
        raise ValueError(f"unknown attention form {name!r}; one of {FORMS}")
    torch.manual_seed(seed)
    model = SpelledDiT(name).eval()
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.ones(batch, 8, dtype=torch.bool)
    keep[-1, -3:] = False  # the last sample's last three text tokens are padding
    inputs = {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "encoder_attention_mask": keep,
    }
    return model, inputs
