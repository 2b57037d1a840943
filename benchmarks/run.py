"""The xdit_compile benchmark suite: one command, one results table, plots, a printed summary.

    python benchmarks/run.py            # full CPU suite (< 15 min on 2 cores)
    python benchmarks/run.py --quick    # tiny shapes, 2 ranks, < 60 s (the CI smoke test)
    python benchmarks/run.py --out DIR  # write RESULTS.md, results.pt and *.png under DIR

Sections (each number is measured in this run; see RESULTS.md for the method notes):
1. communication per rank per forward against the analytical minimum (``benchmarks.analytic``),
   counted by ``xdit_compile.runtime.record_collectives()`` on the second call (inner "eager");
2. speed: 1 process x 1 thread against 2 and 4 processes x 1 thread (gloo), per method;
3. peers: diffusers' native context parallel, para-attn, yunchang (separate venv), xfuser;
4. compile time: backend "xdit" against plain inductor, and the time of our passes alone;
5. memory: peak memory per rank above the resident set, against one rank;
6. the device: CUDA + nccl when a GPU is visible, else CPU + gloo.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")

PEERS_PY = ROOT / "benchmarks" / ".venv-peers" / "bin" / "python"


# ---------------------------------------------------------------------------------- the plan of runs
def methods(quick: bool):
    from benchmarks.analytic import Method

    if quick:
        return [Method("Ulysses 2", ulysses=2), Method("CFG 2", cfg=2)]
    return [
        Method("Ulysses 2", ulysses=2), Method("Ring 2", ring=2), Method("CFG 2", cfg=2),
        Method("USP 2x2", ulysses=2, ring=2), Method("CFG 2 x Ulysses 2", cfg=2, ulysses=2),
    ]


def plan_specs(args: argparse.Namespace) -> dict[str, tuple[int, list[dict[str, Any]]]]:
    """Specs grouped into sets of processes: name -> (processes, specs). One set per model and
    process count, so that a set that fails or times out costs only its own rows."""
    quick = args.quick
    iters = 2 if quick else args.iters
    model_names = ["pixart"] if quick else ["pixart", "flux"]
    inductor_models = [] if quick or args.no_inductor else [m for m in args.inductor.split(",") if m]
    base = dict(job="model", quick=quick, batch=2, iters=iters)
    groups: dict[str, tuple[int, list[dict[str, Any]]]] = {}

    def add(world: int, model: str, spec: dict[str, Any]) -> None:
        groups.setdefault(f"{model}, {world} processes", (world, []))[1].append(spec)

    for model in model_names:
        inners = ["eager"] + (["inductor"] if model in inductor_models else [])
        for inner in inners:
            add(2, model, {**base, "key": f"{model}|1 rank|{inner}", "model": model, "mode": inner,
                           "solo": True, "memory": True})
        for m in methods(quick):
            for inner in inners:
                if inner == "inductor" and m.name != "Ulysses 2":
                    continue  # inductor: the 2-rank Ulysses plan (speed + compile time); see RESULTS.md
                add(m.world, model, {**base, "key": f"{model}|{m.name}|{inner}", "model": model, "mode": "xdit",
                                     "options": m.options(inner), "record": inner == "eager", "memory": True})
        if not quick and model == "flux":
            # diffusers' native context parallel (Flux ships a _cp_plan); main env: it is part of diffusers.
            add(2, model, {**base, "job": "diffusers_cp", "key": "flux|diffusers CP Ulysses 2|eager",
                           "model": "flux", "ulysses": 2, "memory": True})
            add(2, model, {**base, "job": "diffusers_cp", "key": "flux|diffusers CP Ring 2|eager",
                           "model": "flux", "ring": 2, "iters": 1})
        # The baseline again at the end of the set: the 1-rank time is the median over both, so a
        # burst of load from other processes during one of them weighs less.
        add(2, model, {**base, "key": f"{model}|1 rank (again)|eager", "model": model, "mode": "eager",
                       "solo": True, "return_out": False, "iters": 2})
    if not quick:
        # The para-attn comparison model (CogVideoX): baseline and xdit here, para-attn in the peers venv.
        add(2, "cogvideox", {**base, "key": "cogvideox|1 rank|eager", "model": "cogvideox", "mode": "eager",
                             "solo": True, "memory": True})
        add(2, "cogvideox", {**base, "key": "cogvideox|Ulysses 2|eager", "model": "cogvideox", "mode": "xdit",
                             "options": {"inner": "eager", "ulysses_degree": 2}, "record": True, "memory": True})
    return groups


def peer_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    quick = args.quick
    iters = 2 if quick else args.iters
    base = dict(quick=quick, batch=2, iters=iters)
    specs = []
    if not quick:  # quick: only the attention layer (exercises the peers' venv and yunchang)
        for model in ("cogvideox", "flux"):
            specs.append({**base, "job": "para_attn", "key": f"{model}|para-attn Ulysses 2|eager", "model": model,
                          "ulysses": 2, "memory": True})
    # One attention layer at PixArt-alpha 1024px self-attention shape (quick: tiny).
    shape = dict(tokens=256, heads=4, head_dim=16) if quick else dict(tokens=4096, heads=16, head_dim=72)
    specs.append({**base, "job": "attention", "key": "attention|Ulysses 2|eager", **shape, "iters": max(iters, 3)})
    return specs


# ---------------------------------------------------------------------------------- running
def run_group(world: int, specs: list[dict[str, Any]], timeout: float) -> list[list[dict[str, Any]]]:
    from benchmarks.jobs import suite_job
    from xdit_compile.testing import run_spmd

    backend = "nccl" if _cuda() else "gloo"
    env = {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    return run_spmd(suite_job, world, specs, timeout=timeout, backend=backend, env=env)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def run_peers(specs: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
    import torch

    if not PEERS_PY.exists():
        return {"absent": f"{PEERS_PY.relative_to(ROOT)} not found: run benchmarks/setup.sh to measure the peers"}
    tmp = Path(tempfile.mkdtemp(prefix="xdit-bench-peers-"))
    torch.save(specs, tmp / "specs.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(PEERS_PY), "-m", "benchmarks.peers", str(tmp / "specs.pt"), str(tmp / "out.pt"), str(timeout)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)
    if proc.returncode != 0 or not (tmp / "out.pt").exists():
        return {"failed": (proc.stderr or proc.stdout)[-3000:]}
    data = torch.load(tmp / "out.pt", weights_only=False)
    shutil.rmtree(tmp, ignore_errors=True)
    return data


def capacity_probe(processes: int = 2, seconds: float = 2.0) -> float:
    """How many cores ``processes`` busy single-thread processes actually get right now (CPU seconds
    obtained / wall seconds): 2.0 on an idle 2-core machine, less when other work shares it."""
    from multiprocessing import get_context

    from benchmarks.jobs import busy_job

    with get_context("spawn").Pool(processes) as pool:
        cpu = pool.map(busy_job, [seconds] * processes)
    return sum(cpu) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 ranks, a couple of methods (< 60 s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--iters", type=int, default=3, help="timed calls after the compiling call (median)")
    parser.add_argument("--no-inductor", action="store_true", help="skip the inner='inductor' runs")
    parser.add_argument("--inductor", default="flux",
                        help="models measured with inner='inductor' too (1 rank + Ulysses 2, and the compile-time "
                             "section), comma-separated; e.g. pixart,flux (pixart adds ~5 min on 2 cores)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers (separate venv)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per set of processes")
    parser.add_argument("--report-only", metavar="RESULTS_PT",
                        help="rewrite RESULTS.md and the plots from a saved results.pt without measuring")
    parser.add_argument("--peers-only", metavar="RESULTS_PT",
                        help="measure only the peers' venv part and merge it into a saved results.pt")
    parser.add_argument("--groups", help="measure only the process sets whose name contains one of these "
                                         "';'-separated strings (e.g. 'flux, 2;pixart, 4'); with --merge, the others are "
                                         "kept from the saved results")
    parser.add_argument("--merge", metavar="RESULTS_PT", help="start from a saved results.pt and replace what is measured")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so run_spmd's cleanup kills the rank processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from benchmarks import report

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only or args.peers_only:
        import torch

        raw = torch.load(args.report_only or args.peers_only, weights_only=False)
        if args.peers_only:
            args.quick = raw["quick"]
            t = time.perf_counter()
            raw["peers"] = run_peers(peer_specs(args), args.timeout)
            raw["peers"]["measured_separately"] = time.strftime("%Y-%m-%d %H:%M:%S")
            raw["wall_s"] += time.perf_counter() - t
        print(report.write(raw, out, quick=raw["quick"]))
        return 0
    raw: dict[str, Any] = {"quick": args.quick, "groups": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "load_before": os.getloadavg()}
    if args.merge:
        import torch

        raw = torch.load(args.merge, weights_only=False)
        raw.setdefault("remeasured", []).append(time.strftime("%Y-%m-%d %H:%M:%S") + f": {args.groups}")
    wanted = [g.strip() for g in args.groups.split(";")] if args.groups else None
    raw.setdefault("capacity", []).append(("before", capacity_probe()))
    print(f"[bench] 2 busy processes get {raw['capacity'][-1][1]:.2f} cores right now", flush=True)
    for name, (world, specs) in plan_specs(args).items():
        if wanted is not None and not any(w and w in name for w in wanted):
            continue
        t = time.perf_counter()
        print(f"[bench] {name}: {len(specs)} configurations on {world} processes ...", flush=True)
        try:
            raw["groups"][name] = run_group(world, specs, args.timeout)
        except Exception as e:  # noqa: BLE001 - a failed group is reported, the rest still runs
            msg = f"{type(e).__name__}: {str(e)[-1500:]}"
            raw["groups"][name] = [[{"key": s["key"], "error": f"process group failed: {msg}"} for s in specs]]
            print(f"[bench]   FAILED: {msg[:500]}", flush=True)
        print(f"[bench]   done in {time.perf_counter() - t:.0f} s", flush=True)
    if args.no_peers:
        if not args.merge:
            raw["peers"] = {"absent": "skipped (--no-peers)"}
    else:
        t = time.perf_counter()
        print("[bench] peers (separate venv) ...", flush=True)
        raw["peers"] = run_peers(peer_specs(args), args.timeout)
        print(f"[bench]   done in {time.perf_counter() - t:.0f} s", flush=True)
    raw["capacity"].append(("after", capacity_probe()))
    print(f"[bench] 2 busy processes get {raw['capacity'][-1][1]:.2f} cores right now", flush=True)
    raw["load_after"] = os.getloadavg()
    raw["wall_s"] = raw.get("wall_s", 0.0) + time.perf_counter() - start if args.merge else time.perf_counter() - start
    summary = report.write(raw, out, quick=args.quick)
    print(summary)
    print(f"[bench] wrote {out / 'RESULTS.md'} in {raw['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
