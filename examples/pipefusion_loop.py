"""PipeFusion on a tiny DiT: a plain denoising loop against ``pipefusion.run_steps``.

    torchrun --nproc-per-node 2 examples/pipefusion_loop.py                    # pixart, M = 2
    torchrun --nproc-per-node 2 examples/pipefusion_loop.py --model flux --patches 4
    torchrun --nproc-per-node 4 examples/pipefusion_loop.py --ulysses 2         # PP 2 x Ulysses 2

One Euler step (model call and latent update) is compiled with PipeFusion over 2 stages. The
loop runs twice: calling the compiled step once per step (the pipeline fills and drains in
every call), then through ``run_steps`` (the pipeline kept full across steps). Rank 0 prints
both against the eager single-rank loop (stale K/V makes them approximate), whether the two
agree bit for bit, and each rank's step time and bubble (time outside its stage programs, after the warmup).
Uses gloo on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dits import ZOO, make  # noqa: E402

from xdit_compile import pipefusion  # noqa: E402


def euler_step(model: torch.nn.Module, inputs: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """``x -> x + dt * v(x, t)``: everything the loop does per step, so it compiles as one graph."""

    def step(x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        out = model(**{**inputs, "hidden_states": x, "timestep": t}, return_dict=False)[0]
        return x + dt * out[:, : x.shape[1]]

    return step


def schedule(inputs: dict[str, Any], steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(timestep, step size) per step, the timestep going down in the model's own range."""
    ts = inputs["timestep"]
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    return [(torch.full_like(ts, s if ts.is_floating_point() else round(s * 999)), torch.tensor(nxt - s))
            for s, nxt in zip(sigmas, sigmas[1:])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pixart", choices=sorted(ZOO))
    ap.add_argument("--patches", type=int, default=2, help="num_pipeline_patch")
    ap.add_argument("--warmup", type=int, default=1, help="warmup_steps")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ulysses", type=int, default=None, help="ulysses_degree inside each stage")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="max error relative to the latent's scale")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, inputs = make(args.model)
    x0, steps = inputs["hidden_states"], schedule(inputs, args.steps)
    with torch.no_grad():
        ref = x0
        for a in steps:
            ref = euler_step(model, inputs)(ref, *a)
        options = {"pipefusion_parallel_degree": 2, "num_pipeline_patch": args.patches,
                   "warmup_steps": args.warmup, "inner": "eager"}
        if args.ulysses:
            options["ulysses_degree"] = args.ulysses
        step = torch.compile(euler_step(model, inputs), backend="xdit", dynamic=False, options=options)
        step(x0, *steps[0])  # compile
        results = {}
        for name in ("plain loop", "run_steps"):
            pipefusion.reset()
            driver = pipefusion.reports()[-1].driver
            seen = len(driver.timings)
            dist.barrier()
            start = time.perf_counter()
            if name == "run_steps":
                x = pipefusion.run_steps(step, x0, steps)
            else:
                x = x0
                for a in steps:
                    x = step(x, *a)
            wall = time.perf_counter() - start
            timings = [t for t in driver.timings[seen:] if t.kind != "full"]  # the steps after the warmup
            bubble = 1 - sum(t.compute for t in timings) / sum(t.wall for t in timings)
            results[name] = (x, wall / len(steps), bubble)
    err = {k: float((v[0] - ref).abs().max() / ref.abs().max()) for k, v in results.items()}
    same = torch.equal(results["plain loop"][0], results["run_steps"][0])
    lines = [f"rank {rank}: {k}: {v[1] * 1e3:.1f} ms/step, bubble {v[2]:.0%}, err {err[k]:.1e}" for k, v in results.items()]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lines)
    ok = same and all(e < args.tolerance for e in err.values())
    if rank == 0:
        print(pipefusion.reports()[-1])
        print("\n".join(line for per_rank in gathered for line in per_rank))
        print(f"{args.model}: run_steps {'equals' if same else 'DIFFERS FROM'} the plain loop bit for bit; "
              f"error vs one rank {max(err.values()):.1e} (tolerance {args.tolerance:g}): {'OK' if ok else 'FAIL'}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
