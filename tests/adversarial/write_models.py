"""Tiny DiTs that write rotary embeddings into views of q and k in place (written for these tests).

Both keep tokens channels-last on a 2-D grid, as hourglass transformers do, compute axial
RoPE angles from the grid inside the graph, and rotate only the first part of each head:

    hdit_copy       rotated halves written back with ``copy_`` into ``x[..., :d]`` / ``x[..., d:2d]``
                    (method and ``torch.Tensor.copy_``), on q and k normalised for cosine attention
    narrow_inplace  the halves rotated by in-place ops on ``narrow`` views of q and k, which are
                    themselves views of the fused qkv projection; a per-token bias added in place
                    into a slice, a slice of register channels cleared with ``masked_fill_``

``make(name, batch=2, seed=0)`` returns ``(model.eval(), inputs)``, the same for the same seed.
Hidden 64 = 4 heads x 16, 2 layers, latents 4 x 16 x 16 (8 x 8 tokens of 2 x 2 patches).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("hdit_copy", "narrow_inplace")


def _axial_angles(h: int, w: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(h*w, dim) angles: the first half of the channels turn with the row, the rest with the column."""
    rows = torch.linspace(-1.0, 1.0, h, dtype=dtype)
    cols = torch.linspace(-1.0, 1.0, w, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).view(h * w, 2)
    freqs = torch.exp(torch.linspace(math.log(math.pi), math.log(10 * math.pi), dim // 2, dtype=dtype))
    return torch.cat([grid[:, :1] * freqs, grid[:, 1:] * freqs], dim=-1)


def _rotate_copy_(x: torch.Tensor, theta: torch.Tensor, method: bool) -> None:
    """Rotate channels [0, d) against [d, 2d) of ``x`` in place, writing back with ``copy_``."""
    d = theta.shape[-1]
    x1, x2 = x[..., :d], x[..., d: 2 * d]
    cos, sin = theta.cos(), theta.sin()
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if method:
        x1.copy_(y1)
        x2.copy_(y2)
    else:
        torch.Tensor.copy_(x1, y1)
        torch.Tensor.copy_(x2, y2)


def _rotate_narrow_(x: torch.Tensor, theta: torch.Tensor) -> None:
    """The same rotation by in-place arithmetic on ``narrow`` views (the first half is saved first)."""
    d = theta.shape[-1]
    a, b = x.narrow(-1, 0, d), x.narrow(-1, d, d)
    cos, sin = theta.cos(), theta.sin()
    a0 = a.clone()
    a.mul_(cos).sub_(b * sin)
    b.mul_(cos).add_(a0 * sin)


class _AdaNorm(nn.Module):
    """RMS norm whose gain comes from the conditioning vector."""

    def __init__(self, dim: int, cond: int) -> None:
        super().__init__()
        self.gain = nn.Linear(cond, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = 1 + self.gain(c)[:, None, None, :]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, cond: int, style: str) -> None:
        super().__init__()
        self.heads, self.style = heads, style
        self.norm = _AdaNorm(dim, cond)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.scale = nn.Parameter(torch.full((heads,), 4.0))
        self.proj = nn.Linear(dim, dim)
        self.ff_norm = _AdaNorm(dim, cond)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(dim, dim)
        self.tok_bias = nn.Parameter(torch.randn(64, dim // 2) * 0.1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(self.norm(x, c))
        if self.style == "copy":
            q, k, v = qkv.view(b, h * w, 3, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            # Cosine-similarity attention: fresh q, k, then rotated in place.
            q = F.normalize(q, dim=-1) * self.scale[:, None, None]
            k = F.normalize(k, dim=-1)
            _rotate_copy_(q, theta, method=True)
            _rotate_copy_(k, theta, method=False)
        else:
            qkv = qkv.view(b, h * w, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # views of the projection: the rotation writes into it
            _rotate_narrow_(q, theta)
            _rotate_narrow_(k, theta)
        o = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(o.transpose(1, 2).reshape(b, h, w, d))
        m = self.ff_norm(x, c)
        if self.style == "narrow":
            m = m * 1.0
            m.view(b, h * w, d).narrow(-1, 0, d // 2).add_(self.tok_bias[: h * w])
            rows = torch.arange(h * w).view(1, h, w, 1)
            m[..., -4:].masked_fill_(rows % 5 == 0, 0.0)
        a, g = self.up(m).chunk(2, dim=-1)
        return x + self.down(a * F.gelu(g))


class WriteDiT(nn.Module):
    """Patch merge -> blocks on a channels-last token grid -> patch split; timestep-conditioned norms."""

    def __init__(self, style: str, channels: int = 4, dim: int = 64, heads: int = 4, depth: int = 2,
                 patch: int = 2) -> None:
        super().__init__()
        self.patch, self.channels, self.dim, self.heads = patch, channels, dim, heads
        self.merge = nn.Linear(channels * patch * patch, dim)
        self.t_in = nn.Linear(32, dim)
        self.t_out = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dim, style) for _ in range(depth))
        self.split = nn.Linear(dim, channels * patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        b, c, hh, ww = x.shape
        p = self.patch
        h, w = hh // p, ww // p
        tok = x.view(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h, w, c * p * p)
        y = self.merge(tok)
        f = torch.exp(-math.log(1000.0) * torch.arange(16, dtype=x.dtype) / 16)
        ang = t[:, None].to(x.dtype) * f
        cond = self.t_out(F.silu(self.t_in(torch.cat([ang.cos(), ang.sin()], dim=-1))))
        hd = self.dim // self.heads
        theta = _axial_angles(h, w, hd // 4, x.dtype)[None, None]  # rotates the first half of each head
        for blk in self.blocks:
            y = blk(y, cond, theta)
        out = self.split(y).view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)
        return (out,) if not return_dict else out


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[nn.Module, dict]:
    """``(model.eval(), inputs)`` of write model ``name`` (see ``MODELS``)."""
    if name not in MODELS:
        raise KeyError(f"no write model {name!r}; known: {MODELS}")
    torch.manual_seed(seed)
    model = WriteDiT("copy" if name == "hdit_copy" else "narrow").eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {"x": torch.randn(batch, 4, 16, 16, generator=g), "t": torch.linspace(0.1, 0.9, batch) * 1000}
    return model, inputs
