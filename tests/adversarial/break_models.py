"""Small DiT-like models with graph breaks and data-dependent sizes (for tests/test_breaks.py).

    break_mid     a ``torch._dynamo.graph_break()`` between two blocks: the second graph's input
                  is the first graph's (gathered) output
    text_len      ``mask.sum().item()`` gives the number of valid text tokens, used as a slice
                  length (a graph break under torch.compile's defaults, then a Python int)
    packed        tokens packed per sample into a fresh buffer, ``[valid text, image, padding]``
                  at offsets read off the mask (``.tolist()``), then joint blocks on the buffer

``make(name, batch=2, seed=0)`` returns ``(model.eval(), kwargs)``; every forward takes
``return_dict`` (ignored) like a diffusers model, so ``xdit_compile.testing.parity`` runs them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS = 64, 4


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, DIM)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, s, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class _Base(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(4, DIM, 2, 2)
        self.txt = nn.Linear(32, DIM)
        self.blocks = nn.ModuleList(_Block() for _ in range(blocks))
        self.out = nn.Linear(DIM, 16)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(x).flatten(2).transpose(1, 2)


class BreakMid(_Base):
    """Two blocks with a graph break between them."""

    def forward(self, x: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        h = self.embed(x)
        h = self.blocks[0](h)
        torch._dynamo.graph_break()
        h = self.blocks[1](h)
        return (self.out(h),)


class TextLen(_Base):
    """Joint attention over ``[valid text, image]``; the valid length comes from ``.item()``."""

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        n = int(ctx_mask[0].sum().item())  # data-dependent: valid text tokens of sample 0
        img = self.embed(x)
        h = torch.cat([self.txt(ctx[:, :n]), img], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return (self.out(h[:, n:]),)


class Packed(_Base):
    """Per-sample packing into a fresh buffer at offsets read off the mask, then joint blocks."""

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        img = self.embed(x)
        txt = self.txt(ctx)
        lens = ctx_mask.sum(1).tolist()
        b, s_img = img.shape[0], img.shape[1]
        total = max(lens) + s_img
        buf = img.new_zeros(b, total, DIM)
        keep = torch.zeros(b, total, dtype=torch.bool)
        for i, t in enumerate(lens):
            buf[i, :t] = txt[i, :t]
            buf[i, t:t + s_img] = img[i]
            keep[i, :t + s_img] = True
        mask = keep[:, None, None, :]
        h = buf
        for blk in self.blocks:
            h = blk(h, mask)
        out = torch.stack([h[i, t:t + s_img] for i, t in enumerate(lens)])
        return (self.out(out),)


_MODELS = {"break_mid": BreakMid, "text_len": TextLen, "packed": Packed}


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[nn.Module, dict]:
    """Model ``name`` (eval mode) with weights from ``seed`` and its inputs (the same on every rank)."""
    torch.manual_seed(seed)
    model = _MODELS[name]().eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    if name == "break_mid":
        return model, {"x": x}
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[-1, 5:] = 0  # the last sample's last 3 text tokens are padding
    return model, {"x": x, "ctx": torch.randn(batch, 8, 32, generator=g), "ctx_mask": mask}
