"""Run a tiny diffusers pipeline with its transformer and VAE decoder compiled by backend "xdit".

Used by ``pipeline_pixart.py``, ``pipeline_sd3.py`` and ``pipeline_flux.py``; see docs/pipelines.md.

CPU (gloo), 2 processes::

    torchrun --nproc-per-node 2 examples/pipeline_pixart.py --ulysses 2
    torchrun --nproc-per-node 4 examples/pipeline_sd3.py --cfg --ulysses 2 --check
    torchrun --nproc-per-node 2 examples/pipeline_flux.py --ring 2 --output flux.png

GPU (nccl, one process per GPU; inductor as the inner compiler)::

    torchrun --nproc-per-node 4 examples/pipeline_pixart.py --device cuda --cfg --ulysses 2 --inner inductor

What every rank does: the same seed for the (random) weights and for the noise, the same
pipeline call; the transformer's graph is split by the plan (CFG halves over ``--cfg``, tokens
over ``--ulysses`` x ``--ring``), the VAE decoder's rows over all ranks (``--no-parallel-vae``
to keep it replicated). Only rank 0 shows progress bars and writes the PNG; ``--check`` also
runs the single-rank pipeline on every rank and reports the largest difference on any rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_pipelines  # noqa: E402


def parse(model: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"tiny {model} pipeline with backend 'xdit' (run under torchrun)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (splits tokens, swaps heads)")
    p.add_argument("--ring", type=int, default=1, help="Ring-attention degree (splits tokens, passes K/V)")
    p.add_argument("--cfg", action="store_true", help="CFG parallel: the uncond/cond halves on two rank groups")
    p.add_argument("--dp", type=int, default=1, help="data-parallel degree (splits a batch of images)")
    p.add_argument("--no-parallel-vae", action="store_true", help="leave the VAE decoder uncompiled")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="image height and width (pixels)")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the noise, the same on every rank")
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager", help="compiler of the per-rank graphs")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    p.add_argument("--output", default=f"{model}.png")
    p.add_argument("--check", action="store_true", help="compare with the single-rank pipeline on every rank")
    return p.parse_args(argv)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"use_cfg_parallel": args.cfg, "ulysses_degree": args.ulysses, "ring_degree": args.ring,
            "data_parallel_degree": args.dp, "inner": args.inner}


def main(model: str, argv: list[str] | None = None) -> None:
    args = parse(model, argv)
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    try:
        pipe = tiny_pipelines.build(model, seed=args.seed).to(device)  # same weights on every rank
        reference = None
        if args.check:
            reference = tiny_pipelines.generate(pipe, model, args.steps, args.size, args.seed, args.guidance,
                                                progress=False)
        pipe.transformer = torch.compile(pipe.transformer, backend="xdit", options=_options(args))
        if not args.no_parallel_vae:
            # The decoder gets its own plan: its rows over all ranks (it decodes one latent).
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, backend="xdit", options={"inner": args.inner})
        start = time.perf_counter()
        image = tiny_pipelines.generate(pipe, model, args.steps, args.size, args.seed, args.guidance,
                                        progress=rank == 0)
        first = time.perf_counter() - start
        start = time.perf_counter()
        image = tiny_pipelines.generate(pipe, model, args.steps, args.size, args.seed, args.guidance, progress=False)
        second = time.perf_counter() - start
        # Every rank holds the whole image: show that they agree (and with one rank, if asked).
        images = [torch.empty_like(image) for _ in range(world)]
        dist.all_gather(images, image.contiguous())
        spread = max(float((im - images[0]).abs().max()) for im in images)
        error = torch.tensor(float((image - reference).abs().max()) if reference is not None else 0.0, device=device)
        dist.all_reduce(error, op=dist.ReduceOp.MAX)
        if rank == 0:
            import xdit_compile

            for report in xdit_compile.reports():
                print(report)
            print(f"{model}: {world} ranks, {args.steps} steps at {args.size}x{args.size}: first call (compiles) "
                  f"{first:.2f} s, second {second:.2f} s; largest difference between ranks {spread:.2e}")
            if reference is not None:
                print(f"largest difference from the single-rank pipeline on any rank: {float(error):.2e}")
            from diffusers.image_processor import VaeImageProcessor

            VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(image.cpu()))[0].save(args.output)
            print(f"wrote {args.output}")
    finally:
        dist.destroy_process_group()
