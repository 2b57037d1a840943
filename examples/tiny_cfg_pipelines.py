"""Tiny diffusers pipelines that call the transformer once per guidance branch (random weights).

* ``"wan"``: ``WanPipeline`` with a negative prompt (two calls per step: prompt, then negative);
  a tiny ``WanTransformer3DModel`` and ``AutoencoderKLWan``, video of 5 frames at 64 x 64.
* ``"flux"``: ``FluxPipeline`` with true CFG (``true_cfg_scale`` > 1 and negative prompt and pooled
  embeddings: two calls per step); the tiny Flux transformer of ``tiny_dits.py``, 32 x 32.

``build(name)`` returns the pipeline; ``generate(pipe, name, steps)`` the output (a tensor), with
prompt embeddings made from a seed so that every rank (and the single-rank reference) feeds the
same numbers. Also ``sampler(...)``: a hand-written guidance loop with any number of branches per
step on a tiny SD3 transformer, with switches that break the call pattern (tests of misses).
Used by ``tests/test_cfg_calls.py`` and ``benchmarks/cfg_calls.py``; the package names no model.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_dits import ZOO  # noqa: E402

TEXT_LEN, TEXT_DIM = 8, 32
PIPELINES = ("wan", "flux")


def _wan_transformer(layers: int = 2, heads: int = 4) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=128, num_layers=layers, rope_max_seq_len=32,
    )


def build(name: str, seed: int = 0, layers: int | None = None) -> Any:
    """Pipeline ``name`` ("wan" or "flux") with random weights from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    if name == "wan":
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

        vae = AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                           transformer=_wan_transformer(layers or 2).eval())
    if name == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from tiny_pipelines import tiny_vae

        transformer = ZOO["flux"].build().eval()
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    raise ValueError(f"unknown pipeline {name!r}; choose from {PIPELINES}")


def prompt_inputs(name: str, seed: int = 0) -> dict[str, Any]:
    """Prompt and negative prompt embeddings standing in for a text encoder's output."""
    g = torch.Generator().manual_seed(seed + 1000)
    embeds = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    negative = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    if name == "wan":
        return dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative,
                pooled_prompt_embeds=torch.randn(1, TEXT_DIM, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, TEXT_DIM, generator=g), true_cfg_scale=3.0)


def generate(pipe: Any, name: str, steps: int = 8, size: int | None = None, seed: int = 0) -> torch.Tensor:
    """One image (Flux) or video (Wan) from ``pipe`` with a seeded generator, as a tensor."""
    pipe.set_progress_bar_config(disable=True)
    kwargs = prompt_inputs(name, seed)
    if name == "wan":
        kwargs.update(num_frames=5, guidance_scale=5.0)
    size = size or (64 if name == "wan" else 32)
    with torch.no_grad():
        out = pipe(num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(seed),
                   output_type="pt", **kwargs)
    return out.frames if name == "wan" else out.images


# ---------------------------------------------------------------------- a hand-written multi-branch sampler
def sampler_model(seed: int = 0) -> torch.nn.Module:
    """The tiny SD3 transformer (latent (1, 4, 16, 16), text (1, 8, 32), pooled (1, 32))."""
    torch.manual_seed(seed)
    return ZOO["sd3"].build().eval()


def conditionings(branches: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(text, pooled) embeddings per branch: branch 0 the unconditional one."""
    g = torch.Generator().manual_seed(seed + 2000)
    return [(torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(1, TEXT_DIM, generator=g))
            for _ in range(branches)]


def sampler(model: Any, branches: int = 3, steps: int = 8, seed: int = 0, change_negative: bool = False,
            skip_alternate: bool = False, swap_at: int | None = None) -> torch.Tensor:
    """Euler steps of a flow model, guided by ``branches`` calls per step (one per conditioning).

    ``change_negative``: the last branch's embeddings change every step; ``skip_alternate``: branch 1 is
    skipped on odd steps; ``swap_at``: the first two branches are called in reverse order from that step.
    """
    conds = conditionings(branches, seed)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    scales = [1.0] + [2.0 / (branches - 1)] * (branches - 1)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for s in range(steps):
            t = (ts[s] * 1000).reshape(1)
            order = list(range(branches))
            if swap_at is not None and s >= swap_at and branches >= 2:
                order[0], order[1] = order[1], order[0]
            if skip_alternate and s % 2 == 1:
                order.remove(1)
            preds = {}
            for b in order:
                text, pooled = conds[b]
                if change_negative and b == branches - 1:
                    text = text + 0.01 * s
                preds[b] = model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                                 timestep=t, return_dict=False)[0]
            eps = preds[0] + sum(scales[b] * (preds[b] - preds[0]) for b in preds if b)
            x = x + (ts[s + 1] - ts[s]) * eps
    return x
