"""Tiny DiTs for tensor-parallel edge cases (``tests/models/test_tensor_parallel_errors.py``).

    pixart_3heads   3 heads of 16 (hidden 48): TP 2 cannot split the heads, so the attention
                    projections stay whole (reported); the MLP (192 features) still splits

``make(name, batch=2, seed=0) -> (model in eval mode, kwargs)`` like ``tiny_dits.make``.
"""

from __future__ import annotations

from typing import Any

import torch


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    if name != "pixart_3heads":
        raise KeyError(f"no tiny model {name!r} here; known: ['pixart_3heads']")
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        norm_type="ada_norm_single", use_additional_conditions=False, sample_size=16, patch_size=2,
        caption_channels=32, cross_attention_dim=48,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return model, inputs
