"""Tiny DiTs whose token grids the sequence ranks cannot split evenly, and a Swin-style DiT.

Written for these tests in the styles of research code (not copies of any codebase):

    name          latent      patch  tokens   what it exercises
    odd_grid      4x30x30     2      15x15    15 patch rows: 30 latent rows split 15/15 cut a patch
    odd_grid_14   4x14x14     2      7x7      7 patch rows on 4 ranks (14 rows split 4/4/3/3)
    swin          4x32x32     2      16x16    (B, H, W, C) token grid, shifted windows by torch.roll,
                                             window attention with the shifted-window mask
    swin_flat     4x32x32     2      16x16    a roll of the flat token sequence (B, N, C) between blocks

``make(name, batch=2, seed=0)`` returns ``(model.eval(), inputs)``; every forward accepts
``return_dict`` (ignored) like diffusers models, so ``testing.parity`` can call it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def _timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Block(nn.Module):
    """adaLN-zero transformer block over (B, N, D) tokens with fused qkv and SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        h = self.norm1(x) * (1 + sc1.unsqueeze(1)) + sh1.unsqueeze(1)
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1.unsqueeze(1) * self.proj(a)
        h = self.norm2(x) * (1 + sc2.unsqueeze(1)) + sh2.unsqueeze(1)
        return x + g2.unsqueeze(1) * self.mlp(h)


class OddGridDiT(nn.Module):
    """DiT-style: conv patch embedding (kernel = stride = patch), learned position table, adaLN blocks,
    linear head and unpatchify by reshape + einsum."""

    def __init__(self, size: int, patch: int = 2, channels: int = 4, dim: int = 64, heads: int = 4, depth: int = 2):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.grid = size // patch
        self.x_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        b = x.shape[0]
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_embed(_timestep_features(t, h.shape[-1]))
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada(c).chunk(2, dim=1)
        h = self.head(self.norm(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        p, g = self.patch, self.grid
        h = h.reshape(b, g, g, p, p, self.channels)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(b, self.channels, g * p, g * p)


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // ws) * (w // ws), ws * ws, c)


def _window_reverse(win: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b, c = win.shape[0], win.shape[-1]
    x = win.view(b, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Additive mask (windows, ws*ws, ws*ws) keeping a shifted window's regions apart."""
    region = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for rs in cuts:
        for cs in cuts:
            region[:, rs, cs, :] = label
            label += 1
    ids = _window_partition(region, ws).squeeze(0).squeeze(-1)  # (windows, ws*ws)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class _SwinBlock(nn.Module):
    """Window attention over a (B, H, W, C) grid; odd blocks shift the windows by ``torch.roll``."""

    def __init__(self, dim: int, heads: int, ws: int, shift: int, grid: int):
        super().__init__()
        self.heads, self.ws, self.shift = heads, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mod = nn.Linear(dim, 2 * dim)
        self.register_buffer("mask", _shift_mask(grid, grid, ws, shift) if shift else None, persistent=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        scale, shift_c = self.mod(c).chunk(2, dim=-1)
        y = self.norm1(x) * (1 + scale[:, None, None]) + shift_c[:, None, None]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = _window_partition(y, self.ws)  # (B, nW, N, C)
        nw, n = win.shape[1], win.shape[2]
        qkv = self.qkv(win).reshape(b, nw, n, 3, self.heads, d // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nW, heads, N, hd)
        mask = self.mask[None, :, None] if self.mask is not None else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = self.proj(a.transpose(2, 3).reshape(b, nw, n, d))
        a = _window_reverse(a, self.ws, h, w)
        if self.shift:
            a = torch.roll(a, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + a
        return x + self.mlp(self.norm2(x))


class SwinDiT(nn.Module):
    """Swin-style DiT: patch embedding, (B, H, W, C) grid, pairs of plain / shifted window blocks,
    then a global-attention block on the flat tokens (so the sequence ranks have attention to split).
    ``flat_roll`` also rolls the flat token sequence between the window blocks and the global one."""

    def __init__(self, size: int = 32, patch: int = 2, channels: int = 4, dim: int = 64, heads: int = 4,
                 ws: int = 4, flat_roll: bool = False):
        super().__init__()
        self.patch, self.channels, self.flat_roll = patch, channels, flat_roll
        self.grid = size // patch
        self.embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_SwinBlock(dim, heads, ws, s, self.grid) for s in (0, ws // 2))
        self.glob = _Block(dim, heads)
        self.head = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        b = x.shape[0]
        h = self.embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        c = self.t_embed(_timestep_features(t, h.shape[-1]))
        for blk in self.blocks:
            h = blk(h, c)
        g, p = self.grid, self.patch
        tokens = h.reshape(b, g * g, -1)
        if self.flat_roll:
            tokens = tokens.roll(g // 2 + 3, 1)  # a shift that crosses rows, on the flat sequence
        tokens = self.glob(tokens, c)
        if self.flat_roll:
            tokens = tokens.roll(-(g // 2 + 3), 1)
        out = self.head(tokens).reshape(b, g, g, p, p, self.channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.channels, g * p, g * p)


_SPECS: dict[str, Any] = {
    "odd_grid": lambda: (OddGridDiT(30), 30),
    "odd_grid_14": lambda: (OddGridDiT(14), 14),
    "swin": lambda: (SwinDiT(), 32),
    "swin_flat": lambda: (SwinDiT(flat_roll=True), 32),
}

NAMES = list(_SPECS)


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Model ``name`` (see the module docstring) with weights from ``seed``, in eval mode, and its inputs."""
    torch.manual_seed(seed)
    model, size = _SPECS[name]()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {"x": torch.randn(batch, 4, size, size, generator=g),
              "t": torch.rand(batch, generator=g) * 1000}
    return model.eval(), inputs
