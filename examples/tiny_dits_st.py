"""Tiny spatial-temporal DiTs (video): attention within each frame, then across frames.

Two shapes of the same idea, written as plain ``nn.Module``s so that nothing here is a model
the compiler was written for:

* ``opensora``: OpenSora (STDiT)-style. Input latents ``(B, C, T, H, W)``; a patch embedding
  (conv3d, kernel = stride = (1, 2, 2)) gives tokens ``(B, T, S, D)``; every block runs a
  spatial attention (sequence = the ``S`` positions of one frame, batch = ``B * T``), then a
  temporal attention (sequence = the ``T`` frames of one position, batch = ``B * S``), then an
  MLP, each with timestep modulation; a final linear and unpatchify.
* ``opensora_marked``: ``opensora`` with the switch written by hand (``xdit_compile.shard`` of the
  positions before each temporal attention), the plan DSP's authors wrote; the same weights.
* ``latte``: Latte-style. Same embedding, but blocks alternate: even blocks are spatial, odd
  blocks temporal (each a full attention + MLP block).

``make(name, batch=2, seed=0)`` returns ``(model.eval(), inputs)``; the model takes
``hidden_states`` and ``timestep`` and ``return_dict`` like diffusers models, returning a tuple.
Sizes: 4 channels, 8 frames, 16x16 latents (64 positions per frame), hidden 64 = 4 heads x 16.

The parallel plan the compiler should find by itself for these (DSP, Dynamic Sequence
Parallelism, OpenDiT): frames sharded while attention runs within each frame (the attention is
then local: the frames are its batch), positions sharded while it runs across frames, one
all-to-all of the activation at each switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import xdit_compile

Inputs = dict[str, torch.Tensor]


class _Attention(nn.Module):
    """Multi-head self-attention over dim 1 of ``(N, L, D)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(n, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(n, length, dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


def _spatial(attn: _Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention within each frame: ``(B, T, S, D)`` with ``B * T`` sequences of ``S`` tokens."""
    b, t, s, d = x.shape
    return attn(x.reshape(b * t, s, d)).view(b, t, s, d)


def _temporal(attn: _Attention, x: torch.Tensor, mark: bool = False) -> torch.Tensor:
    """Attention across frames: ``B * S`` sequences of ``T`` tokens (one per frame). ``mark``: the
    user says where to switch (``xdit_compile.shard`` of the positions), as DSP's authors would."""
    b, t, s, d = x.shape
    x = x.transpose(1, 2)
    if mark:
        x = xdit_compile.shard(x, dim=1)
    y = attn(x.reshape(b * s, t, d))
    return y.view(b, s, t, d).transpose(1, 2)


class STBlock(nn.Module):
    """One OpenSora block: spatial attention, temporal attention, MLP, each modulated by the timestep."""

    def __init__(self, dim: int, heads: int, mark: bool = False) -> None:
        super().__init__()
        self.mark = mark
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.spatial, self.temporal, self.mlp = _Attention(dim, heads), _Attention(dim, heads), _Mlp(dim)
        self.ada = nn.Linear(dim, 9 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.ada(F.silu(c)).chunk(9, dim=-1)
        x = x + m[2][:, None, None] * _spatial(self.spatial, _modulate(self.norm1(x), m[0], m[1]))
        x = x + m[5][:, None, None] * _temporal(self.temporal, _modulate(self.norm2(x), m[3], m[4]), self.mark)
        return x + m[8][:, None, None] * self.mlp(_modulate(self.norm3(x), m[6], m[7]))


class LatteBlock(nn.Module):
    """One Latte block: attention (within frames when ``spatial``, else across frames), then MLP."""

    def __init__(self, dim: int, heads: int, spatial: bool) -> None:
        super().__init__()
        self.is_spatial = spatial
        self.norm1, self.norm2 = nn.LayerNorm(dim, elementwise_affine=False), nn.LayerNorm(dim, elementwise_affine=False)
        self.attn, self.mlp = _Attention(dim, heads), _Mlp(dim)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.ada(F.silu(c)).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), m[0], m[1])
        h = _spatial(self.attn, h) if self.is_spatial else _temporal(self.attn, h)
        x = x + m[2][:, None, None] * h
        return x + m[5][:, None, None] * self.mlp(_modulate(self.norm2(x), m[3], m[4]))


class TinySTDiT(nn.Module):
    """Patch-embed ``(B, C, T, H, W)``, run the blocks on ``(B, T, S, D)`` tokens, unpatchify."""

    def __init__(self, kind: str, channels: int = 4, dim: int = 64, heads: int = 4, depth: int = 2,
                 frames: int = 8, size: int = 16, patch: int = 2) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.embed = nn.Conv3d(channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))
        grid = size // patch
        self.pos_s = nn.Parameter(torch.randn(1, 1, grid * grid, dim) * 0.02)
        self.pos_t = nn.Parameter(torch.randn(1, frames, 1, dim) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        if kind in ("opensora", "opensora_marked"):
            self.blocks = nn.ModuleList(STBlock(dim, heads, kind == "opensora_marked") for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(LatteBlock(dim, heads, spatial=i % 2 == 0) for i in range(2 * depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, patch * patch * channels)

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(16, dtype=torch.float32) * (9.21 / 16))
        args = t.float()[:, None] * freqs[None]
        return self.t_embed(torch.cat([args.cos(), args.sin()], dim=-1))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                return_dict: bool = True) -> tuple[torch.Tensor]:
        b, c, t, h, w = hidden_states.shape
        p = self.patch
        x = self.embed(hidden_states)  # (B, D, T, H/p, W/p)
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T, S, D)
        x = x + self.pos_s + self.pos_t
        cond = self._timestep(timestep)
        for block in self.blocks:
            x = block(x, cond)
        x = self.out(self.norm_out(x))  # (B, T, S, p*p*C)
        x = x.view(b, t, h // p, w // p, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
        out = x.reshape(b, c, t, h, w)
        return (out,)


NAMES = ("opensora", "latte", "opensora_marked")


def make(name: str, batch: int = 2, seed: int = 0, frames: int = 8, size: int = 16,
         depth: int = 2, dim: int = 64, heads: int = 4) -> tuple[nn.Module, Inputs]:
    """Build model ``name`` (one of ``NAMES``) with weights from ``seed`` and its inputs."""
    if name not in NAMES:
        raise KeyError(f"unknown spatial-temporal model {name!r}; known: {', '.join(NAMES)}")
    torch.manual_seed(seed)
    model = TinySTDiT(name, dim=dim, heads=heads, frames=frames, size=size, depth=depth).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {"hidden_states": torch.randn(batch, 4, frames, size, size, generator=g),
              "timestep": torch.randint(0, 1000, (batch,), generator=g).float()}
    return model, inputs
