"""Flux-like forward, Ulysses 2: xdit vs diffusers' native context parallel, alternating call by call.

    .venv/bin/python benchmarks/flux_cp.py [--rounds 7] [--no-inductor] [--profile] [--out FILE]

Both engines run in the same 2 gloo ranks on the same model (``benchmarks/models.py``'s ``flux``:
1,024 image + 128 text tokens, hidden 1,024 = 8 heads x 128, 1 double + 1 single block, batch 2;
each engine gets its own instance built from the same seed, so the weights are equal) and the same
inputs. Every round calls each engine once, in turn, after a barrier (odd rounds in reverse order):

* ``xdit eager``: ``torch.compile(model, backend="xdit", options={"ulysses_degree": 2, "inner": "eager"})``;
* ``diffusers eager``: ``model.enable_parallelism(ContextParallelConfig(ulysses_degree=2))``;
* ``diffusers inductor``: the same, under ``torch.compile(model)`` (inductor);
* ``xdit inductor``: backend ``xdit`` with ``inner="inductor"``.

Reported per engine: the median over rounds of the slower rank's wall time, the ratio diffusers /
xdit (>= 1: xdit at least as fast), the median CPU seconds per rank (``time.process_time``: less
exposed to other tenants of a shared machine than wall time), and the output's max relative error
against one rank's eager forward. ``--profile`` adds a ``torch.profiler`` table per engine (rank 0,
one call) of the ops where the time goes. The 1-minute load average is recorded per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def flux_job(spec: dict[str, Any]) -> dict[str, Any]:
    """What one rank runs: warm-up and exactness, then ``spec['rounds']`` alternating rounds."""
    import resource
    import warnings

    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    warnings.filterwarnings("ignore", category=FutureWarning)

    from benchmarks import jobs, models

    jobs._patch_device_count()
    quick, batch = spec["quick"], spec["batch"]

    def build() -> tuple[torch.nn.Module, dict[str, Any]]:
        model, inputs, _ = models.build("flux", quick, batch)
        return model, inputs

    ref_model, inputs = build()
    with torch.no_grad():
        ref = ref_model(**inputs, return_dict=False)[0]
    del ref_model
    engines: dict[str, Callable[[], torch.Tensor]] = {}
    xo = {"ulysses_degree": 2, **spec.get("options", {})}

    def xdit(inner: str, **extra: Any) -> Callable[[], torch.Tensor]:
        model, _ = build()
        fn = torch.compile(model, backend="xdit", options={**xo, "inner": inner, **extra})
        return lambda: fn(**inputs, return_dict=False)[0]

    def diffusers(compiled: bool) -> Callable[[], torch.Tensor]:
        model, _ = build()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        fn = torch.compile(model) if compiled else model
        return lambda: fn(**inputs, return_dict=False)[0]

    only = spec.get("only")
    engines["xdit eager"] = xdit("eager")
    engines["diffusers eager"] = diffusers(False)
    if spec.get("unchecked"):
        engines["xdit eager, check_inputs=False"] = xdit("eager", check_inputs=False)
    if spec["inductor"]:
        engines["diffusers inductor"] = diffusers(True)
        engines["xdit inductor"] = xdit("inductor")
    if only:
        engines = {k: v for k, v in engines.items() if k in only}
    err: dict[str, float] = {}
    first: dict[str, float] = {}
    scale = float(ref.abs().max())
    with torch.no_grad():
        for name, call in engines.items():  # compile, warm up, check
            dist.barrier()
            start = time.perf_counter()
            out = call()
            first[name] = time.perf_counter() - start
            out = call()
            err[name] = float((out - ref).abs().max()) / scale
        profiles: dict[str, str] = {}
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            for name, call in engines.items():
                dist.barrier()
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    call()
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                # Where the copies come from: copy-like ops by input shapes.
                copies = [e for e in prof.key_averages(group_by_input_shape=True)
                          if e.key in ("aten::copy_", "aten::cat", "aten::clone", "aten::stack", "aten::mul", "aten::neg")]
                copies.sort(key=lambda e: -e.self_cpu_time_total)
                rows = [f"{e.key:<14} x{e.count:<3} {e.self_cpu_time_total / 1e3:9.2f} ms  {str(e.input_shapes)[:150]}"
                        for e in copies[:15]]
                profiles[name] = table + "\ncopies and elementwise ops by input shapes (self CPU):\n" + "\n".join(rows)
        times: dict[str, list[float]] = {name: [] for name in engines}
        cpu: dict[str, list[float]] = {name: [] for name in engines}
        faults: dict[str, list[int]] = {name: [] for name in engines}  # minor page faults per call
        load: list[float] = []
        names = list(engines)
        for i in range(spec["rounds"]):
            load.append(os.getloadavg()[0])
            # Odd rounds reverse the order, so neither engine of a pair always runs first.
            for name in (names if i % 2 == 0 else names[::-1]):
                call = engines[name]
                dist.barrier()
                faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start, cpu_start = time.perf_counter(), time.process_time()
                call()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start)
    return {"rank": dist.get_rank(), "times": times, "cpu": cpu, "faults": faults, "err": err, "first": first, "load": load,
            "profiles": profiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny Flux (smoke test)")
    parser.add_argument("--no-inductor", action="store_true", help="eager pair only")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table per engine (rank 0)")
    parser.add_argument("--only", default="", help="comma-separated engine names to run (debugging)")
    parser.add_argument("--no-check-inputs", action="store_true", help="xdit with check_inputs=False")
    parser.add_argument("--unchecked-too", action="store_true",
                        help="add an engine: xdit eager with check_inputs=False (what the per-call input check costs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flux_cp.md"))
    args = parser.parse_args()
    from xdit_compile.testing import run_spmd

    spec = {"quick": args.quick, "batch": 2, "rounds": args.rounds, "inductor": not args.no_inductor,
            "profile": args.profile, "only": [s.strip() for s in args.only.split(",") if s.strip()],
            "options": {"check_inputs": False} if args.no_check_inputs else {}, "unchecked": args.unchecked_too}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = run_spmd(flux_job, 2, spec, timeout=3600, env={"OMP_NUM_THREADS": "1"})
    total = time.perf_counter() - t0
    load_after = os.getloadavg()
    names = list(results[0]["times"])
    # A forward ends when its slower rank is done.
    per_round = {n: [max(r["times"][n][i] for r in results) for i in range(args.rounds)] for n in names}
    med = {n: statistics.median(ts) for n, ts in per_round.items()}
    cpu = {n: statistics.median(max(r["cpu"][n][i] for r in results) for i in range(args.rounds)) for n in names}
    loads = results[0]["load"]
    lines = [
        "# Flux-like forward, Ulysses 2: xdit vs diffusers' native context parallel (`benchmarks/flux_cp.py`)",
        "",
        f"Model: `benchmarks/models.py` flux{' (quick)' if args.quick else ''} (FluxTransformer2DModel, "
        "1 double + 1 single block; full size: 1,024 image + 128 text tokens, hidden 1,024 = 8 x 128), batch 2, "
        f"float32, 2 gloo ranks x 1 thread, {args.rounds} alternating rounds (each round calls every engine once, "
        f"after a barrier, in the order below on even rounds and reversed on odd ones), median of the slower rank per round. xdit options: {spec['options'] or 'defaults'}.",
        f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}; 1-minute load per round {', '.join(f'{x:.2f}' for x in loads)}; "
        f"shared 2-core machine; whole run {total:.0f} s.",
        "",
        "| engine | median wall s | CPU s / rank (median, slower rank) | page faults / call (median, rank 0) | first call s | max rel err vs 1 rank | rounds, wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {med[n]:.3f} | {cpu[n]:.3f} | {statistics.median(results[0]['faults'][n]):,.0f} | "
                     f"{results[0]['first'][n]:.1f} | "
                     f"{max(r['err'][n] for r in results):.2e} | {', '.join(f'{t:.3f}' for t in per_round[n])} |")
    lines += ["", "| inner | diffusers / xdit, wall (>= 1: xdit at least as fast) | per-round ratios | best-of (fastest round) "
              "diffusers / xdit | diffusers / xdit, CPU |", "|---|---|---|---|---|"]
    for inner in ("eager", "inductor"):
        x, d = f"xdit {inner}", f"diffusers {inner}"
        if x in med and d in med:
            ratios = [per_round[d][i] / per_round[x][i] for i in range(args.rounds)]
            lines.append(f"| {inner} | **{med[d] / med[x]:.3f}** (median of per-round ratios "
                         f"{statistics.median(ratios):.3f}) | {', '.join(f'{r:.2f}' for r in ratios)} | "
                         f"{min(per_round[d]):.3f} / {min(per_round[x]):.3f} = {min(per_round[d]) / min(per_round[x]):.3f} | "
                         f"{cpu[d] / cpu[x]:.3f} |")
    for n, table in results[0]["profiles"].items():
        lines += ["", f"## Profile, {n} (rank 0, one call)", "", "```", table, "```"]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
