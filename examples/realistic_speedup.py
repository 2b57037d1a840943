"""One realistic-shape run: a PixArt layer at 1024 px's token count, one rank vs all ranks, in the same run.

    torchrun --nproc-per-node 2 examples/realistic_speedup.py        # Ulysses 2 (scripts/demo.sh runs this)

The tiny models of ``run_parallel.py`` are overhead-bound; this one is attention-bound: a
PixArtTransformer2DModel (random weights, built from its config) with a 4x128x128 latent, i.e. 4,096
image tokens as at 1024 px, hidden 256 = 4 heads x 64, one layer, 16 text tokens, batch 1. Attention
is about 2/3 of its FLOPs. Every rank first runs the model eagerly on its own (the single-rank reference,
one thread per process, so on a 2-core machine the two references do not slow each other), then the
``backend="xdit"`` program; the two are timed in alternation, ``--repeat`` times each, and rank 0 prints
the medians, their ratio and the error against the reference. Uses gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xdit_compile  # noqa: E402
from launch import init_ranks  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(size: int, heads: int, head_dim: int, text: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model and its inputs, identical on every rank (seeded)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    hidden = heads * head_dim
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=1,
        norm_type="ada_norm_single", use_additional_conditions=False, sample_size=size, patch_size=2,
        caption_channels=hidden, cross_attention_dim=hidden,
    ).eval().to(device)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 4, size, size, generator=g).to(device),
        "encoder_hidden_states": torch.randn(1, text, hidden, generator=g).to(device),
        "timestep": torch.tensor([500]).to(device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return model, inputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="latent side (tokens = (size/2)^2)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--text", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls of each, alternating")
    ap.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    rank, world, device = init_ranks()
    model, inputs = build(args.size, args.heads, args.head_dim, args.text, device)
    options = {"inner": args.inner, "ulysses_degree": world}
    compiled = torch.compile(model, backend="xdit", options=options)

    def timed(fn) -> tuple[torch.Tensor, float]:
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - start

    t_ref, t_par = [], []
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]  # warm-up
        out = compiled(**inputs, return_dict=False)[0]  # compiles
        for _ in range(args.repeat):
            ref, t = timed(lambda: model(**inputs, return_dict=False)[0])
            t_ref.append(t)
            out, t = timed(lambda: compiled(**inputs, return_dict=False)[0])
            t_par.append(t)
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    errs: list = [None] * world
    dist.all_gather_object(errs, err)
    worst = max(errs)
    if rank == 0:
        tokens = (args.size // 2) ** 2
        ref_s, par_s = statistics.median(t_ref), statistics.median(t_par)
        print(f"realistic shape: PixArt layer, {tokens} image tokens (1024 px), hidden {args.heads * args.head_dim}, "
              f"batch 1, Ulysses {world} on {world} {device.type} ranks (inner {args.inner})")
        print(f"  1 rank {ref_s * 1e3:.0f} ms, {world} ranks {par_s * 1e3:.0f} ms (medians of {args.repeat}, "
              f"alternating): speedup {ref_s / par_s:.2f}x, rel err {worst:.1e}"
              + ("   MISMATCH" if worst > args.tolerance else ""))
    dist.destroy_process_group()
    return 1 if worst > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
