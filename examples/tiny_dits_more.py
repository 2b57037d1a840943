"""Unseen tiny diffusers DiTs (draft)."""

from __future__ import annotations

import torch

try:
    from tiny_dits import Inputs, TinyDiT
except ImportError:  # repo root on sys.path instead of examples/
    from examples.tiny_dits import Inputs, TinyDiT


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _text_mask(b: int, n: int = 8, pad: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A text-padding mask as pipelines send it: all ones, the last sample's last ``pad`` tokens are padding."""
    mask = torch.ones(b, n, dtype=dtype)
    mask[-1, n - pad:] = 0
    return mask


def _ids_2d(h: int, w: int) -> torch.Tensor:
    """Flux-style (h*w, 3) position ids: (0, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


# --------------------------------------------------------------------------------------------- HunyuanDiT
def _hunyuan_dit() -> torch.nn.Module:
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=16,
        hidden_size=64, num_layers=4, cross_attention_dim=32, cross_attention_dim_t5=32,
        pooled_projection_dim=32, text_len=8, text_len_t5=8,
    )


def _hunyuan_dit_inputs(b: int, g: torch.Generator) -> Inputs:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), output_type="pt")
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "timestep": torch.randint(0, 1000, (b,), generator=g).float(),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "text_embedding_mask": _text_mask(b),
        "encoder_hidden_states_t5": _randn(g, b, 8, 32),
        "text_embedding_mask_t5": _text_mask(b),
        "image_meta_size": torch.tensor([[128.0, 128.0, 128.0, 128.0, 0.0, 0.0]]).repeat(b, 1),
        "style": torch.zeros(b, dtype=torch.long),
        "image_rotary_emb": rope,
    }


# --------------------------------------------------------------------------------------------- Sana
def _sana() -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=64,
        caption_channels=32, sample_size=16, patch_size=2,
    )


def _sana_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_attention_mask": _text_mask(b),
    }


# --------------------------------------------------------------------------------------------- AuraFlow
def _auraflow() -> torch.nn.Module:
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
        out_channels=4, pos_embed_max_size=64,
    )


def _auraflow_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.rand(b, generator=g),
    }


# --------------------------------------------------------------------------------------------- Lumina2
def _lumina2() -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=1, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 64, 64), cap_feat_dim=32,
    )


def _lumina2_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "timestep": torch.rand(b, generator=g),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "encoder_attention_mask": _text_mask(b, dtype=torch.bool),
    }


# --------------------------------------------------------------------------------------------- LuminaNext
def _lumina_next() -> torch.nn.Module:
    from diffusers import LuminaNextDiT2DModel

    return LuminaNextDiT2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_attention_heads=4,
        num_kv_heads=2, multiple_of=16, cross_attention_dim=32,
    )


def _lumina_next_inputs(b: int, g: torch.Generator) -> Inputs:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "timestep": torch.rand(b, generator=g),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "encoder_mask": _text_mask(b),
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(16, 32, 32),
        "cross_attention_kwargs": {},
    }


# --------------------------------------------------------------------------------------------- Wan
def _wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
    )


def _wan_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 2, 16, 16),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": _randn(g, b, 8, 32),
    }


# --------------------------------------------------------------------------------------------- SkyReels-V2
def _skyreels_v2() -> torch.nn.Module:
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32, num_frame_per_block=2,
    )


def _skyreels_v2_inputs(b: int, g: torch.Generator) -> Inputs:
    # diffusion forcing: one timestep per latent frame, block-causal attention over blocks of 2 frames
    return {
        "hidden_states": _randn(g, b, 4, 4, 16, 16),
        "timestep": torch.randint(0, 1000, (b, 4), generator=g),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "enable_diffusion_forcing": True,
    }


# --------------------------------------------------------------------------------------------- QwenImage
def _qwenimage() -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )


def _qwenimage_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 64, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "encoder_hidden_states_mask": _text_mask(b, dtype=torch.long),
        "timestep": torch.rand(b, generator=g),
        "img_shapes": [(1, 8, 8)] * b,
    }


# --------------------------------------------------------------------------------------------- Mochi
def _mochi() -> torch.nn.Module:
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=4, attention_head_dim=16, num_layers=2, pooled_projection_dim=32,
        in_channels=4, text_embed_dim=32, time_embed_dim=32, max_sequence_length=8,
    )


def _mochi_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 2, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_attention_mask": _text_mask(b, dtype=torch.bool),
    }


# --------------------------------------------------------------------------------------------- LTX-Video
def _ltx() -> torch.nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=16, out_channels=16, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=16, cross_attention_dim=64, num_layers=2, caption_channels=32,
    )


def _ltx_inputs(b: int, g: torch.Generator) -> Inputs:
    f, h, w = 2, 8, 8
    return {
        "hidden_states": _randn(g, b, f * h * w, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_attention_mask": _text_mask(b),
        "num_frames": f,
        "height": h,
        "width": w,
    }


# --------------------------------------------------------------------------------------------- Allegro
def _allegro() -> torch.nn.Module:
    from diffusers import AllegroTransformer3DModel

    return AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=4, attention_head_dim=24, in_channels=4,
        out_channels=4, num_layers=2, cross_attention_dim=96, sample_height=16, sample_width=16,
        sample_frames=2, caption_channels=32,
    )


def _allegro_inputs(b: int, g: torch.Generator) -> Inputs:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    f, h, w = 2, 8, 8
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=24, crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=f,
        interpolation_scale=(2.2, 2.0, 2.0),
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return {
        "hidden_states": _randn(g, b, 4, f, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_attention_mask": _text_mask(b),
        "image_rotary_emb": ((freqs_t, freqs_h, freqs_w), tuple(pos)),
    }


# --------------------------------------------------------------------------------------------- CogView3Plus
def _cogview3plus() -> torch.nn.Module:
    from diffusers import CogView3PlusTransformer2DModel

    return CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        out_channels=4, text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16,
        sample_size=16,
    )


def _cogview_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "original_size": torch.tensor([[128.0, 128.0]]).repeat(b, 1),
        "target_size": torch.tensor([[128.0, 128.0]]).repeat(b, 1),
        "crop_coords": torch.zeros(b, 2),
    }


# --------------------------------------------------------------------------------------------- CogView4
def _cogview4() -> torch.nn.Module:
    from diffusers import CogView4Transformer2DModel

    return CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, text_embed_dim=32, time_embed_dim=32, condition_dim=8,
        pos_embed_max_size=16, sample_size=16, rope_axes_dim=(64, 64),
    )


# --------------------------------------------------------------------------------------------- HiDream-I1
def _hidream() -> torch.nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=4, caption_channels=[32, 32], text_emb_dim=32,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 6, 6), max_resolution=(16, 16),
        llama_layers=[0, 1],
    )


def _hidream_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "timesteps": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states_t5": _randn(g, b, 8, 32),
        "encoder_hidden_states_llama3": _randn(g, 2, b, 8, 32),
        "pooled_embeds": _randn(g, b, 32),
    }


# --------------------------------------------------------------------------------------------- Chroma
def _chroma() -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1,
    )


def _chroma_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 64, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.rand(b, generator=g),
        "img_ids": _ids_2d(8, 8),
        "txt_ids": torch.zeros(8, 3),
        "attention_mask": torch.cat([_text_mask(b, dtype=torch.bool), torch.ones(b, 64, dtype=torch.bool)], 1),
    }


# --------------------------------------------------------------------------------------------- Flux2
def _flux2() -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )


def _flux2_inputs(b: int, g: torch.Generator) -> Inputs:
    img_ids = torch.zeros(8, 8, 4)
    img_ids[..., 1] = torch.arange(8)[:, None]
    img_ids[..., 2] = torch.arange(8)[None, :]
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8)
    return {
        "hidden_states": _randn(g, b, 64, 16),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "timestep": torch.rand(b, generator=g),
        "img_ids": img_ids.reshape(64, 4).unsqueeze(0).repeat(b, 1, 1),
        "txt_ids": txt_ids.unsqueeze(0).repeat(b, 1, 1),
    }


# --------------------------------------------------------------------------------------------- HunyuanVideo
def _hunyuan_video() -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
    )


def _hunyuan_video_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 2, 16, 16),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": _randn(g, b, 8, 32),
        "encoder_attention_mask": _text_mask(b),
        "pooled_projections": _randn(g, b, 32),
    }


# --------------------------------------------------------------------------------------------- OmniGen
def _omnigen() -> torch.nn.Module:
    from diffusers import OmniGenTransformer2DModel

    return OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, num_layers=2, pad_token_id=0, vocab_size=64, max_position_embeddings=1024,
        original_max_position_embeddings=1024, rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
        pos_embed_max_size=16, time_step_dim=32,
    )


def _omnigen_inputs(b: int, g: torch.Generator) -> Inputs:
    n_txt = 7  # 7 text + 1 time token + 64 image tokens = 72
    s = n_txt + 1 + 64
    return {
        "hidden_states": _randn(g, b, 4, 16, 16),
        "timestep": torch.rand(b, generator=g),
        "input_ids": torch.randint(1, 64, (b, n_txt), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(b, s, s),
        "position_ids": torch.arange(s).unsqueeze(0).repeat(b, 1),
    }


# --------------------------------------------------------------------------------------------- EasyAnimate
def _easyanimate() -> torch.nn.Module:
    from diffusers import EasyAnimateTransformer3DModel

    return EasyAnimateTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
        sample_width=16, sample_height=16, num_layers=2, mmdit_layers=2, time_embed_dim=32,
        text_embed_dim=32,
    )


def _easyanimate_inputs(b: int, g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, b, 4, 2, 16, 16),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": _randn(g, b, 8, 32),
    }


ZOO_MORE: dict[str, TinyDiT] = {
    t.name: t
    for t in [
        TinyDiT("hunyuan_dit", _hunyuan_dit, _hunyuan_dit_inputs, "cross"),
        TinyDiT("sana", _sana, _sana_inputs, "cross"),
        TinyDiT("auraflow", _auraflow, _auraflow_inputs, "joint"),
        TinyDiT("lumina2", _lumina2, _lumina2_inputs, "joint"),
        TinyDiT("lumina_next", _lumina_next, _lumina_next_inputs, "cross"),
        TinyDiT("wan", _wan, _wan_inputs, "cross"),
        TinyDiT("skyreels_v2", _skyreels_v2, _skyreels_v2_inputs, "cross"),
        TinyDiT("qwenimage", _qwenimage, _qwenimage_inputs, "joint"),
        TinyDiT("mochi", _mochi, _mochi_inputs, "joint"),
        TinyDiT("ltx", _ltx, _ltx_inputs, "cross"),
        TinyDiT("allegro", _allegro, _allegro_inputs, "cross"),
        TinyDiT("cogview3plus", _cogview3plus, _cogview_inputs, "joint"),
        TinyDiT("cogview4", _cogview4, _cogview_inputs, "joint"),
        TinyDiT("hidream", _hidream, _hidream_inputs, "joint"),
        TinyDiT("chroma", _chroma, _chroma_inputs, "joint"),
        TinyDiT("flux2", _flux2, _flux2_inputs, "joint"),
        TinyDiT("hunyuan_video", _hunyuan_video, _hunyuan_video_inputs, "joint"),
        TinyDiT("omnigen", _omnigen, _omnigen_inputs, "joint"),
        TinyDiT("easyanimate", _easyanimate, _easyanimate_inputs, "joint"),
    ]
}


def make_more(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, Inputs]:
    """Build unseen model ``name`` with weights from ``seed`` and its example inputs, in eval mode."""
    torch.manual_seed(seed)
    model = ZOO_MORE[name].build().eval()
    return model, ZOO_MORE[name].inputs(batch, torch.Generator().manual_seed(seed + 1))
