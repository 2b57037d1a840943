"""A second zoo of tiny diffusers DiTs that ``xdit_compile`` was NOT designed for ("unseen models").

Same contract as ``tiny_dits.ZOO``: each ``TinyDiT`` builds a model with random weights from its config (no hub
access) and example keyword inputs; ``make_more(name, batch=2, seed=0)`` returns ``(model.eval(), inputs)``,
deterministic from the seed. Hidden 64 = 4 heads x 16 and 1-2 (HunyuanDiT: 4) layers where the model allows,
latents 4x16x16 (video: 4 channels x 2-4 frames x 16x16), 8 text tokens. Text masks are what pipelines send:
the last sample's last 3 text tokens are padding. One eager forward takes 2-30 ms on 2 idle CPU cores
(the first call of a process is slower); all 20 run on batch 1, 2 and 3.

Checked with ``python examples/inspect_zoo.py`` (torch 2.13.0 CPU, diffusers 0.42.1). Every model: eager
forward works and is deterministic; ``torch.compile(backend=<records gm, returns gm.forward>, fullgraph=False)``
equals eager exactly (max abs diff 0.0). "graphs" is how many FX graphs Dynamo produced with fullgraph=False
(graphs - 1 graph breaks). "SDPA" lists calls to ``F.scaled_dot_product_attention`` in the (full) graph as
pos(itional) / kw(keyword) x count with Q-len/K-len; masks are ``attn_mask`` shapes. RMS = diffusers' RMSNorm,
which arrives decomposed (pow, mean, add, rsqrt, mul); ``rms_norm`` = ``torch.rms_norm`` (``nn.RMSNorm``).

=============  ======  ======  =========  ===========================  ===================================
model          attn    graphs  fullgraph  SDPA (Q/K len)               masks
=============  ======  ======  =========  ===========================  ===================================
hunyuan_dit    cross   1       ok         pos×8 (64/64, 64/16)         none (text padding replaced by a
                                                                       learned embedding via torch.where)
sana           cross   1       ok         pos×2 (64/8, cross only)     float additive (B,H,1,8)
auraflow       joint   1       ok         pos×2 (80/80), scale=0.25    none
lumina2        joint   4       FAIL (1)   pos×3 (8/8, 64/64, 72/72)    bool (B,1,1,8), (B,1,1,72)
lumina_next    cross   1       ok         pos×4 (64/64, 64/8)          bool (B,H,64,64), (B,H,64,8)
wan            cross   1       ok         kw×4 (128/128, 128/8)        none
skyreels_v2    cross   1       ok         kw×4 (256/256, 256/8)        bool block-causal (1,1,256,256)
qwenimage      joint   1       ok         kw×2 (72/72)                 bool (B,1,1,72)
mochi          joint   11 (2)  ok (3)     pos×5: pool 1/9, 4× per-     bool (B,1,1,9) on the pool; main
                                          sample (1,H,u+128,D)         attention drops padding by nonzero
ltx            cross   1       ok         kw×4 (128/128, 128/8)        float additive (B,H,1,8)
allegro        cross   1       ok         pos×4 (128/128, 128/8)       float additive (B,H,1,8)
cogview3plus   joint   1       ok         pos×2 (72/72)                none
cogview4       joint   1       ok         pos×2 (72/72)                none
hidream        joint   19      FAIL (4)   pos×2 (88/88)                none
chroma         joint   1       ok         kw×2 (72/72)                 bool square (B,1,72,72)
flux2          joint   1       ok         kw×2 (72/72)                 none
hunyuan_video  joint   1       ok         pos×1 (8/8) + kw×2 (136/136) bool (B,H,8,8), (B,1,1,136)
omnigen        joint   4       FAIL (5)   pos×2 (72/72)                float additive square (B,1,72,72)
easyanimate    joint   1       ok         pos×2 (136/136)              none
z_image        joint   1       ok         kw×4 (64/64, 32/32, 96/96)   none (captions padded to 32 with a
                                                                       learned pad token)
=============  ======  ======  =========  ===========================  ===================================

=============  =====================  ==========================================  ==================================
model          norms                  patch embedding                             RoPE
=============  =====================  ==========================================  ==================================
hunyuan_dit    layer_norm (+qk LN)    conv2d k=s=2                                real unbind/stack; (cos, sin) of
                                                                                  shape (S, 16) are model inputs
sana           layer_norm, RMS        conv2d k=s=2                                none
auraflow       layer_norm (+qk LN)    view/permute/flatten -> linear              none (learned pos-embed crop)
lumina2        RMS (+1 layer_norm)    view/permute/flatten -> linear              complex view_as_complex
lumina_next    layer_norm (qk), RMS   view/permute/flatten -> linear              complex; a complex (32,32,8)
                                                                                  table input sliced in graph
wan            layer_norm, rms_norm   conv3d k=s=(1,2,2)                          real, unbind + strided setitem
                                                                                  out[..., 0::2] = ...
skyreels_v2    layer_norm, rms_norm   conv3d k=s=(1,2,2)                          as wan
qwenimage      layer_norm, RMS (qk)   linear on packed tokens                     complex view_as_complex
mochi          RMS (+1 layer_norm)    conv2d k=s=2 per frame (B*F,C,H,W)          real x[...,0::2]/x[...,1::2]
                                                                                  reads + stack
ltx            rms_norm (qk), RMS,    linear on packed tokens (B, F*H*W, C)       real unbind/stack, grid from
               layer_norm                                                         num_frames/height/width ints
allegro        layer_norm             conv2d k=s=2 per frame                      rotate-half per third of head;
                                                                                  cos/sin gathered by F.embedding
                                                                                  with position-index inputs
cogview3plus   layer_norm             view/permute -> linear (text joins inside)  none (sincos pos-embed)
cogview4       layer_norm             reshape/permute/flatten -> linear           rotate-half, image part only
                                                                                  (slice setitem q[:, :, 8:] = ..)
hidream        layer_norm, rms_norm   reshape/permute -> linear                   rotation matrices
                                                                                  stack([cos,-sin,sin,cos]), all
                                                                                  tokens (text ids = 0)
chroma         layer_norm, rms_norm   linear on packed tokens                     real unbind/stack from ids
flux2          layer_norm, rms_norm   linear on packed tokens                     real unbind/stack, 4-axis ids
hunyuan_video  layer_norm, RMS        conv3d k=s=(1,2,2)                          real unbind/stack, image part
                                                                                  only (slice setitem)
omnigen        RMS (+ final LN)       conv2d k=s=2 (+ sincos pos-embed crop)      rotate-half from position_ids
easyanimate    layer_norm (+qk LN)    conv2d k=s=2 per frame                      real unbind/stack, image part
                                                                                  only (slice setitem)
z_image        RMS (+1 layer_norm)    per-sample view/permute/reshape, cat ->     complex view_as_complex
                                      linear
=============  =====================  ==========================================  ==================================

No model has ``group_norm``; none uses ``enable_gqa``; none passes ``is_causal``.

Oddities, per model:

* hunyuan_dit: U-ViT long skip (layer 0 -> layer 3: cat + linear); two text encoders concatenated (8 + 8 = 16
  cross tokens); RoPE on Q in cross-attention too; output has 2x channels (learn_sigma).
* sana: self-attention is ReLU *linear attention* written as matmuls (``V_pad @ K^T`` sums over all tokens,
  then ``@ Q``, divided by a padded ones-row) - no SDPA; the FFN (GLUMBConv) reshapes tokens back to
  (B, C, H, W) and runs a depthwise 3x3 conv, which mixes neighbouring tokens.
* auraflow: 8 learned register tokens prepended to the text: sequence [reg 8, text 8, image 64].
* lumina2 (1): ``encoder_attention_mask.sum(1).tolist()`` -> 2 graph breaks; with fullgraph=True "could not
  extract specialized integer from data-dependent expression u0 + 64". Tokens are packed per sample
  [valid text, image, zero padding] with Python loops and 18 setitems, so the token layout depends on the
  mask; GQA (2 KV heads) by manual ``unsqueeze/repeat/flatten`` of K/V; context (text) and noise (image)
  refiner blocks before the joint blocks.
* lumina_next: GQA by manual repeat; masks come already expanded to (B, H, Sq, Sk); tanh-gated cross-attn.
* wan / skyreels_v2: RMSNorm of q/k across all heads (before the head split). skyreels_v2 runs diffusion
  forcing: per-frame timesteps (B, 4) -> per-token modulation (B, 6, S, D), and a block-causal mask built in
  the graph (repeat_interleave/repeat/reshape).
* qwenimage: text/image dual streams, joint [text, image]; RoPE frequencies from the Python list
  ``img_shapes``; mask from text mask + ones (max/where).
* mochi (2, 3): the attention processor loops over the batch and keeps the valid text tokens with
  ``torch.nonzero`` -> graph breaks; with fullgraph=False the 4 main SDPA calls run *outside every graph*
  (only the text attention-pool SDPA is captured); with fullgraph=True they are batch-1 SDPAs over
  [image 128, valid text u] with unbacked lengths ``u + 128``, padded back with F.pad. Image-first order;
  asymmetric streams (text width 32, image width 64).
* allegro: head_dim 24 (its 3-axis RoPE needs head_dim divisible by 3 with even thirds), so hidden = 96.
* cogview3plus / cogview4 / easyanimate: joint [text, image]; cogview4 and easyanimate apply RoPE to the
  image part with slice setitem at the absolute offset text_len.
* hidream (4): MoE FFN (softmax gate, topk, argsort, ``bincount().cpu().numpy()``, then per-expert index
  gathers and an in-place ``scatter_reduce_`` that run between graphs) -> 8 graph breaks / 19 graphs;
  fullgraph=True fails ("data-dependent expression u0"). All attention is inside the graphs.
  Image-first joint sequence [image 64, t5 8, llama 8, per-layer llama 8] = 88.
* chroma: modulation from a distilled approximator MLP; square mask from the outer product of a token mask.
* hunyuan_video: image-first [image 128, text 8]; the key-padding mask is built in the graph from effective
  lengths (sum, masked_fill); a text token refiner with its own (B,H,8,8) mask and a masked mean pool.
* omnigen (5): ``torch.max(position_ids) + 1 > original_max_position_embeddings`` is a data-dependent branch ->
  1 graph break, fullgraph=True fails; rotary module writes ``self.inv_freq`` in forward; text token
  embedding inside the model; sequence [text 7, time token 1, image 64] and the output is the last 64 tokens.
* z_image: inputs are Python lists of per-sample tensors (latents, captions of 8 and 5 tokens); captions are
  padded on the host to a multiple of 32 and filled with a learned pad token; image-first [image 64,
  caption 32] = 96.

Under backend "xdit" (``{"ulysses_degree": 2}`` and ``{"ring_degree": 2}`` on 2 gloo ranks, eager inner): all 20
match single-rank eager within 3e-7 relative on every rank, with no graph wholly replicated; per-rank FLOPs are
0.49-0.57 of one rank's for 17 models (lumina2 0.78: text refiners and 4 graphs; hidream and mochi: MoE / attention
run between graphs, so the counted share is not comparable). Self/joint attention lowers to Ulysses / Ring
everywhere except text-only refiners (unsharded inputs) and mochi (its main attention runs outside every graph).
``tests/models/test_unseen_models.py`` checks ten of them.

Dropped: none of the models tried. Not tried (time): Cosmos, HunyuanImage, HunyuanVideo-1.5, SanaVideo,
Bria, Kandinsky, LongCat, Ovis, PRX, Wan-VACE/Animate, CogVideoX-derived ConsisID.
"""

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


# --------------------------------------------------------------------------------------------- Z-Image
def _z_image() -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=4, n_kv_heads=4, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 64, 64],
    )


def _z_image_inputs(b: int, g: torch.Generator) -> Inputs:
    # per-sample lists: latents (C, F, H, W) and captions of different lengths (8, 5, 8, 5, ...)
    return {
        "x": [_randn(g, 4, 1, 16, 16) for _ in range(b)],
        "t": torch.rand(b, generator=g),
        "cap_feats": [_randn(g, 8 if i % 2 == 0 else 5, 32) for i in range(b)],
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
        TinyDiT("z_image", _z_image, _z_image_inputs, "joint"),
    ]
}


def make_more(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, Inputs]:
    """Build unseen model ``name`` with weights from ``seed`` and its example inputs, in eval mode."""
    torch.manual_seed(seed)
    model = ZOO_MORE[name].build().eval()
    return model, ZOO_MORE[name].inputs(batch, torch.Generator().manual_seed(seed + 1))
