"""A hand-written DiT in the style of research code that writes tensors in place as statements.

Nobody tuned the passes for it: CompVis-style ``masked_fill_`` on an attention bias, RoPE
tables filled with ``copy_`` into a slice, ``F.silu(..., inplace=True)`` and ``clamp_`` whose
results are unused, and ``x[..] = v`` setitem. Eager, on one rank, it is the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, local_writes: bool) -> None:
        super().__init__()
        self.heads = heads
        self.local_writes = local_writes
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.q_ctx = nn.Linear(dim, dim)
        self.kv_ctx = nn.Linear(dim, 2 * dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.ada = nn.Linear(dim, 2 * dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, h: torch.Tensor, e: torch.Tensor, ctx: torch.Tensor, ctx_keep: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        hd = d // self.heads
        shift, scale = self.ada(e)[:, None].chunk(2, dim=-1)
        x = self.norm1(h) * (1 + scale) + shift
        q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(n, dtype=h.dtype)[:, None] / n
        cos = torch.cos(pos * torch.arange(1, hd // 2 + 1, dtype=h.dtype))
        if self.local_writes:
            # Writes into tensors placed like the data written: a sharded result, scaled in place.
            q = q * torch.cat([cos, torch.ones_like(cos)], dim=-1)
            q.mul_(1.5)
            k = k * 1.5
            bias = torch.zeros(b, 1, 1, ctx.shape[1], dtype=h.dtype).masked_fill(~ctx_keep[:, None, None, :], -1e4)
        else:
            # RoPE-like table written into a slice in place (k-diffusion / HDiT style): the
            # table is made whole, so its token shard must be a copy taken after the write.
            table = torch.ones(n, hd, dtype=h.dtype)
            table[:, : hd // 2].copy_(cos)
            q = q * table
            k = k * table
            bias = torch.zeros(b, 1, 1, ctx.shape[1], dtype=h.dtype)
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        if not self.local_writes:
            # Cross attention with a CompVis-style bias: filled in place, result unused.
            bias.masked_fill_(~ctx_keep[:, None, None, :], -1e4)
        qc = self._split(self.q_ctx(self.norm2(h)))
        kc, vc = (self._split(t) for t in self.kv_ctx(ctx).chunk(2, dim=-1))
        h = h + F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias).transpose(1, 2).reshape(b, n, d)
        m = self.fc1(h)
        m.masked_fill_(m > 3.0, 3.0)
        F.silu(m, inplace=True)
        m.clamp_(min=-3.0)
        return h + self.fc2(m)


class ToyDiT(nn.Module):
    """Patch conv -> blocks -> linear unpatchify; timestep embedding with in-place activations."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 4, depth: int = 2, patch: int = 2,
                 local_writes: bool = False) -> None:
        super().__init__()
        self.patch, self.channels, self.dim = patch, channels, dim
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.t1 = nn.Linear(dim, dim)
        self.t2 = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, local_writes) for _ in range(depth))
        self.out = nn.Linear(dim, channels * patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, ctx_keep: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.embed(x).flatten(2).transpose(1, 2)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(self.dim // 2, dtype=x.dtype) / (self.dim // 2))
        ang = t[:, None].to(x.dtype) * freqs[None]
        temb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
        e = self.t1(temb)
        F.silu(e, inplace=True)
        e = self.t2(e)
        for blk in self.blocks:
            h = blk(h, e, ctx, ctx_keep)
        y = self.out(h)
        y[..., 0] = y[..., 0] * 0.5  # setitem on the output tokens
        p = self.patch
        y = y.view(b, hh // p, ww // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(b, c, hh, ww)


def make_toy(local_writes: bool = False, batch: int = 2, seed: int = 0, size: int = 16) -> tuple[ToyDiT, dict[str, torch.Tensor]]:
    """The model (eval mode) and inputs, the same on every rank for the same seed.

    ``local_writes=False`` writes into tensors made whole (a table written in place, then read
    by sharded tokens: its shard must be taken after the write); ``True`` writes only where
    each rank's write is its own. The plans shard the model both ways.
    """
    torch.manual_seed(seed)
    model = ToyDiT(local_writes=local_writes).eval()
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.ones(batch, 6, dtype=torch.bool)
    keep[:, 4:] = False
    inputs = {
        "x": torch.randn(batch, 4, size, size, generator=g),
        "t": torch.full((batch,), 500.0),
        "ctx": torch.randn(batch, 6, 32, generator=g),
        "ctx_keep": keep,
    }
    return model, inputs
