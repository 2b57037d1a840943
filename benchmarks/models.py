"""Benchmark models: diffusers DiTs built from their configs with random weights (no hub access).

Each ``Spec`` names a diffusers class, the config overrides that give a realistic shape with few
layers, and the inputs. ``build(name, quick, device)`` returns ``(model, inputs, shape)`` where
``shape`` holds what the analytical communication formulas need (batch, tokens, hidden, ...).

Shapes (full suite):

* ``pixart``: PixArt-alpha 1024 px: latent 4x128x128 -> 64x64 patches = 4,096 image tokens,
  hidden 1,152 = 16 heads x 72, caption_channels 4,096, 120 text tokens. Reduced from 28 layers
  to ``PIXART_LAYERS`` (one eager forward of one layer at batch 2 takes ~10-25 s on one core).
* ``flux``: Flux-like joint model (FluxTransformer2DModel): 1,024 image tokens (512 px), 128 text
  tokens, hidden 1,024 = 8 heads x 128, 1 double + 1 single block (Flux.1: 3,072 hidden, 19 + 38
  blocks, 512 text tokens: reduced so the suite fits in 15 minutes on 2 cores).
* ``cogvideox``: CogVideoX-like video model for the para-attn comparison (its CPU Ulysses path).

``--quick`` uses hidden 64-128 and a few hundred tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PIXART_LAYERS = 1


@dataclass(frozen=True)
class Shape:
    """What the analytical minimum needs, per model (global, unsharded sizes)."""

    batch: int
    image_tokens: int
    text_tokens: int
    hidden: int
    heads: int
    out_per_token: int  # output elements per image token (patch^2 x out_channels)
    self_layers: int  # attention layers over the image (or joint image+text) tokens
    joint: bool  # text tokens take part in the self/joint attention (sharded with the image)
    cross_layers: int  # cross-attention layers against replicated text (no communication)
    elem: int = 4  # bytes per element (float32)

    @property
    def attn_tokens(self) -> int:
        return self.image_tokens + (self.text_tokens if self.joint else 0)


def _pixart(quick: bool, batch: int, g: torch.Generator) -> tuple[torch.nn.Module, dict[str, Any], Shape]:
    from diffusers import PixArtTransformer2DModel

    if quick:
        heads, hd, size, text, cap, layers = 4, 16, 32, 8, 32, 1
    else:
        heads, hd, size, text, cap, layers = 16, 72, 128, 120, 4096, PIXART_LAYERS
    hidden = heads * hd
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hd, in_channels=4, out_channels=8,
        num_layers=layers, norm_type="ada_norm_single", use_additional_conditions=False,
        sample_size=size, patch_size=2, caption_channels=cap, cross_attention_dim=hidden,
    )
    inputs = {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, cap, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    tokens = (size // 2) ** 2
    shape = Shape(batch, tokens, text, hidden, heads, 2 * 2 * 8, layers, False, layers)
    return model, inputs, shape


def _flux(quick: bool, batch: int, g: torch.Generator) -> tuple[torch.nn.Module, dict[str, Any], Shape]:
    from diffusers import FluxTransformer2DModel

    if quick:
        heads, hd, side, text, rope = 4, 16, 8, 8, (4, 6, 6)
    else:
        heads, hd, side, text, rope = 8, 128, 32, 128, (16, 56, 56)
    in_ch, joint_dim, pooled = 64, 4096 if not quick else 32, 768 if not quick else 32
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_ch, num_layers=1, num_single_layers=1, attention_head_dim=hd,
        num_attention_heads=heads, joint_attention_dim=joint_dim, pooled_projection_dim=pooled,
        axes_dims_rope=rope,
    )
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    inputs = {
        "hidden_states": torch.randn(batch, side * side, in_ch, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, joint_dim, generator=g),
        "pooled_projections": torch.randn(batch, pooled, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids.reshape(side * side, 3),
        "txt_ids": torch.zeros(text, 3),
    }
    # One double (joint) block and one single block: both attend over cat([text, image]).
    shape = Shape(batch, side * side, text, heads * hd, heads, in_ch, 2, True, 0)
    return model, inputs, shape


def _cogvideox(quick: bool, batch: int, g: torch.Generator) -> tuple[torch.nn.Module, dict[str, Any], Shape]:
    from diffusers import CogVideoXTransformer3DModel

    if quick:
        heads, hd, size, frames, text, layers = 4, 16, 16, 2, 8, 1
    else:
        heads, hd, size, frames, text, layers = 8, 64, 48, 4, 64, 1
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=hd, in_channels=4, out_channels=4, time_embed_dim=128,
        text_embed_dim=256, num_layers=layers, sample_width=size, sample_height=size,
        sample_frames=(frames - 1) * 4 + 1, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=text, use_rotary_positional_embeddings=False,
    )
    inputs = {
        "hidden_states": torch.randn(batch, frames, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, 256, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
    }
    tokens = frames * (size // 2) ** 2
    shape = Shape(batch, tokens, text, heads * hd, heads, 2 * 2 * 4, layers, True, 0)
    return model, inputs, shape


BUILDERS = {"pixart": _pixart, "flux": _flux, "cogvideox": _cogvideox}

TITLES = {
    "pixart": "PixArt-alpha 1024px shape (PixArtTransformer2DModel)",
    "flux": "Flux-like joint model (FluxTransformer2DModel)",
    "cogvideox": "CogVideoX-like video model (CogVideoXTransformer3DModel)",
}


def build(name: str, quick: bool, batch: int = 2, seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any], Shape]:
    """The model in eval mode with weights from ``seed``, its inputs, and its ``Shape``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model, inputs, shape = BUILDERS[name](quick, batch, g)
    model = model.eval().to(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model, inputs, shape


def describe(name: str, shape: Shape) -> str:
    text = f", {shape.text_tokens} text tokens" + (" (joint)" if shape.joint else " (cross-attention)")
    return (f"{TITLES[name]}: batch {shape.batch}, {shape.image_tokens} image tokens{text}, hidden "
            f"{shape.hidden} = {shape.heads} heads x {shape.hidden // shape.heads}, "
            f"{shape.self_layers} self/joint attention layer(s)")
