"""The main job: tiny diffusers DiTs run in parallel with backend "xdit", checked against one rank.

    torchrun --nproc-per-node 2 examples/run_parallel.py                     # auto plan
    torchrun --nproc-per-node 4 examples/run_parallel.py --ulysses 2 --cfg   # CFG x Ulysses
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 examples/run_parallel.py             # two machines

Every rank builds the same model from the same seed, runs it eagerly (the single-rank
reference), then compiled with ``backend="xdit"``, and compares. Rank 0 prints one line per
model (max error relative to the output's scale, latency of both) and the plan report.
Uses gloo on CPU and nccl on CUDA.
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
from tiny_dits import ZOO, make  # noqa: E402
from launch import init_ranks  # noqa: E402

import xdit_compile  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeat: int) -> tuple[torch.Tensor, float]:
    out = fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO), help="comma-separated names from examples/tiny_dits.py")
    ap.add_argument("--ulysses", type=int, default=None, help="ulysses_degree")
    ap.add_argument("--ring", type=int, default=None, help="ring_degree")
    ap.add_argument("--cfg", action="store_true", help="use_cfg_parallel (batch 2 = cond/uncond)")
    ap.add_argument("--dp", type=int, default=None, help="data_parallel_degree")
    ap.add_argument("--inner", default="eager", choices=["eager", "inductor"], help="compiler for the per-rank graph")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per model")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max error relative to the output's scale")
    args = ap.parse_args()

    rank, world, device = init_ranks()
    options: dict = {"inner": args.inner}
    for key, val in (("ulysses_degree", args.ulysses), ("ring_degree", args.ring), ("data_parallel_degree", args.dp)):
        if val is not None:
            options[key] = val
    if args.cfg:
        options["use_cfg_parallel"] = True

    failures = 0
    if rank == 0:
        print(f"xdit_compile {xdit_compile.__version__}: {world} ranks on {device.type}, options {options}")
        print(f"{'model':<11} {'rel err':>9} {'eager 1 rank':>13} {'xdit':>9} {'speedup':>8}  plan")
    for name in args.models.split(","):
        model, inputs = make(name)
        model = model.to(device)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        xdit_compile.clear_reports()
        with torch.no_grad():
            ref, t_ref = _time(lambda: model(**inputs, return_dict=False)[0], device, args.repeat)
            compiled = torch.compile(model, backend="xdit", options=options)
            out, t_par = _time(lambda: compiled(**inputs, return_dict=False)[0], device, args.repeat)
        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        errs = [torch.zeros(()) for _ in range(world)]
        dist.all_gather_object(errs, err)
        worst = max(errs)
        failures += worst > args.tolerance
        if rank == 0:
            plan = xdit_compile.reports()[-1].plan if xdit_compile.reports() else "?"
            print(f"{name:<11} {worst:9.2e} {t_ref * 1e3:10.2f} ms {t_par * 1e3:6.2f} ms {t_ref / t_par:7.2f}x  {plan}"
                  + ("   MISMATCH" if worst > args.tolerance else ""))
        if rank == 0 and os.environ.get("XDIT_LOG", "") == "" and name == args.models.split(",")[0]:
            print("\n".join("    " + line for line in str(xdit_compile.reports()[-1]).splitlines()))
        torch._dynamo.reset()
    if rank == 0:
        print("parity: OK on every rank" if not failures else f"parity: {failures} model(s) MISMATCH")
        print("(tiny models: latency is dominated by per-call overheads; see benchmarks/ for realistic shapes)")
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
