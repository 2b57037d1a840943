"""Tiny diffusers pipelines with random weights, built from configs (no hub access, no text encoder).

``build(name)`` returns a pipeline whose transformer is the tiny DiT of ``examples/tiny_dits.py``
and whose VAE is a small ``AutoencoderKL`` (block_out_channels (32, 64), so a 16x16 latent
decodes to a 32x32 image). ``generate(pipe, name, ...)`` runs it with prompt embeddings made
from a seed, so every rank (and the single-rank reference) feeds the same numbers.

Shared by ``examples/pipeline.py`` and ``tests/models/test_pipelines.py``; the
``xdit_compile`` package itself never names a model.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_dits import ZOO  # noqa: E402

TEXT_LEN, TEXT_DIM = 8, 32
PIPELINES = ("pixart", "sd3", "flux")


def tiny_vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (32, 64), groups: int = 8) -> torch.nn.Module:
    """A small AutoencoderKL: ``2 ** (len(block_out_channels) - 1)`` pixels per latent pixel."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out_channels, layers_per_block=1,
        norm_num_groups=groups, latent_channels=latent_channels, sample_size=32, scaling_factor=0.5,
        shift_factor=0.0,  # SD3 and Flux pipelines read it
    ).eval()


def build(name: str, seed: int = 0) -> Any:
    """Pipeline ``name`` ("pixart", "sd3" or "flux") with random weights from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    transformer = ZOO[name].build().eval()
    vae = tiny_vae()
    if name == "pixart":
        from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

        return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler())
    if name == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    if name == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    raise ValueError(f"unknown pipeline {name!r}; choose from {PIPELINES}")


def prompt_inputs(name: str, seed: int = 0) -> dict[str, Any]:
    """Prompt (and negative prompt) embeddings standing in for a text encoder's output."""
    g = torch.Generator().manual_seed(seed + 1000)
    embeds = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    negative = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    if name == "pixart":
        mask = torch.ones(1, TEXT_LEN, dtype=torch.long)
        mask[:, -2:] = 0  # padded text tokens: exercises the attention mask
        return dict(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                    negative_prompt_attention_mask=torch.ones(1, TEXT_LEN, dtype=torch.long), negative_prompt=None,
                    use_resolution_binning=False)
    pooled = torch.randn(1, TEXT_DIM, generator=g)
    if name == "sd3":
        return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                    negative_pooled_prompt_embeds=torch.randn(1, TEXT_DIM, generator=g))
    return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)


def generate(pipe: Any, name: str, steps: int = 8, size: int = 32, seed: int = 0, guidance: float = 4.5,
             output_type: str = "pt", progress: bool = True) -> Any:
    """One image from ``pipe`` with a seeded generator (the same seed on every rank gives the same noise)."""
    pipe.set_progress_bar_config(disable=not progress)
    kwargs = prompt_inputs(name, seed)
    with torch.no_grad():
        out = pipe(num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs)
    return out.images
