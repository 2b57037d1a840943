"""Tiny diffusers DiTs with random weights, built from their configs (no hub access).

Each entry of ``ZOO`` builds a model (hidden 64 = 4 heads x 16, 1-2 layers) and a dict of
example keyword inputs. Tests, examples and benchmarks share these; the ``xdit_compile``
package itself never names a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Inputs = dict[str, Any]


@dataclass(frozen=True)
class TinyDiT:
    """A tiny model and how to feed it."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, torch.Generator], Inputs]
    attention: str  # "cross", "joint", "self" or "spatio-temporal": what the tests expect to see


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _pixart() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        norm_type="ada_norm_single", use_additional_conditions=False, sample_size=16, patch_size=2,
        caption_channels=32, cross_attention_dim=64,
    )


def _pixart_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
    )


def _sd3_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "pooled_projections": _randn(g, b, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
    }


def _flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )


def _flux_inputs(b: int, g: torch.Generator) -> Inputs:
    h = w = 8
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "hidden_states": _randn(g, b, h * w, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "pooled_projections": _randn(g, b, 32),
        "timestep": torch.rand(b, generator=g),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(8, 3),
    }


def _dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=16,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    )


def _dit_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "class_labels": torch.randint(0, 1000, (b,), generator=g),
    }


def _latte() -> torch.nn.Module:
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=16, patch_size=2, cross_attention_dim=64, caption_channels=32, video_length=4,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    )


def _latte_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 4, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
    }


def _cogvideox() -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8,
    )


def _cogvideox_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 2, 4, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
    }


ZOO: dict[str, TinyDiT] = {
    t.name: t
    for t in [
        TinyDiT("pixart", _pixart, _pixart_inputs, "cross"),
        TinyDiT("sd3", _sd3, _sd3_inputs, "joint"),
        TinyDiT("flux", _flux, _flux_inputs, "joint"),
        TinyDiT("dit", _dit, _dit_inputs, "self"),
        TinyDiT("latte", _latte, _latte_inputs, "spatio-temporal"),
        TinyDiT("cogvideox", _cogvideox, _cogvideox_inputs, "joint"),
    ]
}


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, Inputs]:
    """Build model ``name`` with weights from ``seed`` and its example inputs, in eval mode."""
    torch.manual_seed(seed)
    model = ZOO[name].build().eval()
    return model, ZOO[name].inputs(batch, torch.Generator().manual_seed(seed + 1))
