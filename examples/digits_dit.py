"""A tiny class-conditional DiT trained on scikit-learn's 8x8 handwritten digits, and its CFG sampler.

The model is a plain ``nn.Module`` in the style of DiT / PixArt (patchify conv with kernel == stride,
learned positions, adaLN-single modulation from timestep + class, pre-norm attention and MLP blocks,
unpatchify by reshape/permute); ``xdit_compile`` has never heard of it. It predicts the rectified-flow
velocity ``noise - x0`` for ``x_t = (1 - t) x0 + t noise``; class ``10`` is the "no class" label that
classifier-free guidance uses for the unconditional half.

Weights: ``examples/weights/digits_dit.pt`` (float16, trained by ``examples/train_digits.py`` in a few
minutes on one CPU core). Images are 8x8, values in [-1, 1] (the data set's 0..16 scaled).

    make("digits", batch=2)  -> (model.eval(), {"x": ..., "t": ..., "y": ...})   # parity_many factory
    sample(model, labels, steps=16, guidance=3.0, seed=0)  -> (N, 1, 8, 8) images
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "digits_dit.pt")
NULL_CLASS = 10


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to 0..1000 as DiT does), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    """Pre-norm self-attention + MLP, modulated by the shared adaLN vector plus a per-block table."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden, mlp_ratio * hidden)
        self.fc2 = nn.Linear(mlp_ratio * hidden, hidden)
        self.table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.table[None] + mod.view(b, 6, h)).chunk(6, dim=1)
        y = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(y).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + gate1 * self.proj(a.transpose(1, 2).reshape(b, s, h))
        y = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class DigitsDiT(nn.Module):
    """x (B, 1, 8, 8), t (B,) in [0, 1], y (B,) int64 in 0..10 (10 = no class) -> velocity (B, 1, 8, 8)."""

    def __init__(self, hidden: int = 64, heads: int = 4, depth: int = 4, patch: int = 2, image: int = 8,
                 mlp_ratio: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.hidden, self.patch, self.image = hidden, patch, image
        self.grid = image // patch
        self.patch_embed = nn.Conv2d(1, hidden, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, hidden) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(classes + 1, hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.out_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)
        self.out = nn.Linear(hidden, patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_embed(timestep_embedding(t, self.hidden)) + self.y_embed(y)
        mod = self.ada(c)
        for block in self.blocks:
            tokens = block(tokens, mod)
        shift, scale = (self.out_table[None] + c[:, None]).chunk(2, dim=1)
        out = self.out(self.norm_out(tokens) * (1 + scale) + shift)
        g, p = self.grid, self.patch
        return out.view(b, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, g * p, g * p)


def load(path: str = WEIGHTS) -> DigitsDiT:
    """The trained model in float32, eval mode."""
    model = DigitsDiT()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def make(name: str = "digits", batch: int = 2, seed: int = 0) -> tuple[nn.Module, dict]:
    """``parity_many`` factory: the trained model (or random weights for ``"digits_random"``) and inputs."""
    if name not in ("digits", "digits_random"):
        raise KeyError(f"unknown model {name!r}: this module has 'digits' and 'digits_random'")
    torch.manual_seed(seed)
    model = load() if name == "digits" else DigitsDiT().eval()
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(batch, 1, 8, 8, generator=g),
              "t": torch.rand(batch, generator=g),
              "y": torch.randint(0, NULL_CLASS + 1, (batch,), generator=g)}
    return model, inputs


@torch.no_grad()
def sample(model: Callable[..., torch.Tensor], labels: torch.Tensor, steps: int = 16, guidance: float = 3.0,
           seed: int = 0) -> torch.Tensor:
    """Euler steps of the rectified flow from noise (t=1) to data (t=0) with classifier-free guidance.

    Every call of ``model`` is ONE batched call over ``[cond; uncond]`` (batch 2N, the conditional half
    first), which is what ``use_cfg_parallel`` splits across ranks. Deterministic from ``seed``.
    """
    n = labels.shape[0]
    device = labels.device
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = torch.full((2 * n,), float(ts[i]), device=device)
        v = model(torch.cat([x, x]), t, y)
        v_cond, v_uncond = v[:n], v[n:]
        x = x + float(ts[i + 1] - ts[i]) * (v_uncond + guidance * (v_cond - v_uncond))
    return x.clamp(-1.0, 1.0)


def recognise(images: torch.Tensor) -> list[int] | None:
    """The digit a logistic-regression classifier fitted on the data set sees in each (N, 1, 8, 8) image.

    An independent judge of "recognisable" (about 97% accurate on the data set itself); None when
    scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    digits = load_digits()
    clf = LogisticRegression(max_iter=3000).fit(digits.data, digits.target)
    data = ((images.detach().cpu().double().reshape(images.shape[0], -1) + 1) * 8).numpy()  # [-1, 1] -> 0..16
    return [int(c) for c in clf.predict(data)]


def write_png(path: str, image: torch.Tensor) -> None:
    """Write a (H, W) tensor in [0, 1] as an 8-bit grayscale PNG (zlib only: no imaging package needed)."""
    import struct
    import zlib

    data = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    h, w = data.shape
    raw = b"".join(b"\x00" + bytes(data[r].tolist()) for r in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def tile(images: torch.Tensor, scale: int = 8, pad: int = 1) -> torch.Tensor:
    """(N, 1, 8, 8) in [-1, 1] -> one row (H, W) in [0, 1], each image upscaled by ``scale`` (nearest)."""
    ims = ((images[:, 0] + 1) / 2).clamp(0, 1)
    ims = ims.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    ims = F.pad(ims, (pad, pad, pad, pad), value=1.0)
    return torch.cat(list(ims), dim=1)
