"""A recognisable picture: the trained digits DiT sampled with CFG across ranks, next to one rank's samples.

    torchrun --nproc-per-node 4 examples/digits_cfg.py     # CFG 2 x Ulysses 2 (scripts/demo.sh runs this)
    torchrun --nproc-per-node 2 examples/digits_cfg.py     # CFG 2

Every rank samples the ten digits 0-9 twice from the same noise: eagerly (the single-rank reference)
and with ``torch.compile(model, backend="xdit", options={"use_cfg_parallel": True, "ulysses_degree":
world // 2})``. Each denoising step is one batched call over [cond; uncond], so CFG parallelism gives
each half of the batch its own ranks, and Ulysses splits the 16 tokens of each image inside them.
Rank 0 writes a PNG with three rows (single rank, xdit, |difference| on the same scale: black = equal),
prints the samples as text and the max difference. The model (``digits_dit.py``) is a plain
``nn.Module`` trained by ``train_digits.py``; its weights are in ``examples/weights/``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_dit import load, recognise, sample, tile, write_png  # noqa: E402
from launch import init_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ascii_row(images: torch.Tensor) -> list[str]:
    """(N, 1, 8, 8) in [-1, 1] as 8 lines of text, one 8-character cell per image."""
    ramp = " .:-=+*#%@"
    return ["  ".join("".join(ramp[min(9, int((v + 1) / 2 * 10))] for v in im[0, r].tolist()) for im in images)
            for r in range(images.shape[-2])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "demo", "digits_cfg.png"))
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    rank, world, device = init_ranks()
    if world % 2:
        raise SystemExit(f"digits_cfg.py: CFG parallelism needs an even number of ranks, got {world}")
    options: dict = {"inner": args.inner, "use_cfg_parallel": True}
    if world > 2:
        options["ulysses_degree"] = world // 2
    model = load().to(device)
    labels = torch.arange(10, device=device)
    ref = sample(model, labels, args.steps, args.guidance, args.seed)
    compiled = torch.compile(model, backend="xdit", options=options)
    out = sample(compiled, labels, args.steps, args.guidance, args.seed)
    diff = float((out - ref).abs().max())
    diffs: list = [None] * world
    dist.all_gather_object(diffs, diff)
    worst = max(diffs)
    if rank == 0:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        gap = torch.ones(4, 10 * 66)
        rows = [tile(ref.cpu()), gap, tile(out.cpu()), gap, tile(((out - ref).abs() - 1).cpu())]
        write_png(args.out, torch.cat(rows, dim=0))
        plan = ", ".join(f"{k} {v}" for k, v in options.items() if k != "inner")
        print(f"digits 0-9 sampled with CFG (guidance {args.guidance}, {args.steps} steps) on {world} ranks "
              f"({plan}), each step one batched [cond; uncond] call:")
        print("\n".join("  " + line for line in ascii_row(out.cpu())))
        seen = recognise(out)
        if seen is not None:
            hits = sum(int(a == b) for a, b in zip(seen, range(10)))
            print(f"  a classifier fitted on the data set reads {seen}: {hits}/10 as asked")
        print(f"  max |xdit - single rank| = {worst:.1e} (images in [-1, 1]) over every rank"
              + ("   MISMATCH" if worst > args.tolerance else ""))
        print(f"  wrote {os.path.relpath(args.out)}: rows = single rank, xdit, |difference| (black = equal)")
    dist.destroy_process_group()
    return 1 if worst > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
