"""PipeFusion against Ulysses and Ring on 2 ranks: bytes moved per step and per-step latency.

    python benchmarks/pipefusion_bench.py            # small PixArt-like DiT, CPU/gloo, 2 ranks
    python benchmarks/pipefusion_bench.py --quick    # the tiny test model (seconds)

Every method compiles the same Euler step (model call and latent update in one function;
random weights, same seed) with backend "xdit" and runs ``--steps`` steps with a decreasing
timestep (the CFG halves batched as PixArt's pipeline does). PipeFusion's first step is its
warmup (W = 1, full sequence); the table reports the steady steps after it. The plain rows call
the compiled step once per step (the pipeline fills and drains in every call); the
``run_steps`` rows hand the loop to ``pipefusion.run_steps``, which keeps the pipeline full
across steps. Bytes are what each rank hands to the network per step (the largest over the
ranks): PipeFusion's point-to-point sends between the stages and the broadcast of the output
(``pipefusion.record_p2p``), and every collective (``runtime.collectives.record_collectives``:
all-to-alls, ring shifts, gathers). "bubble" is the share of each PipeFusion rank's wall time
spent outside its stage programs (``PipelineDriver.timings``). "err" is the last latent against
the single-rank one, relative to its scale (stale K/V makes PipeFusion approximate; Ulysses
and Ring are exact).

Prints a Markdown table and writes ``benchmarks/results/pipefusion.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

def _pf(m: int) -> dict[str, Any]:
    return {"pipefusion_parallel_degree": 2, "num_pipeline_patch": m, "warmup_steps": 1}


# (name, xdit options, through pipefusion.run_steps) on 2 ranks.
METHODS: list[tuple[str, dict[str, Any], bool]] = [
    ("PipeFusion P=2, M=2", _pf(2), False),
    ("PipeFusion P=2, M=2, run_steps", _pf(2), True),
    ("PipeFusion P=2, M=4", _pf(4), False),
    ("PipeFusion P=2, M=4, run_steps", _pf(4), True),
    ("PipeFusion P=2, M=1 (exact)", {"pipefusion_parallel_degree": 2, "num_pipeline_patch": 1}, False),
    ("Ulysses 2", {"ulysses_degree": 2}, False),
    ("Ring 2", {"ring_degree": 2}, False),
]


def build(quick: bool, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """A PixArt-like DiT (self + cross attention per block) and its inputs, batch 2 (CFG halves)."""
    from diffusers import PixArtTransformer2DModel

    if quick:
        heads, hd, size, layers, text, cap = 4, 16, 16, 2, 8, 32
    else:
        heads, hd, size, layers, text, cap = 4, 32, 64, 4, 16, 64
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hd, in_channels=4, out_channels=8, num_layers=layers,
        norm_type="ada_norm_single", use_additional_conditions=False, sample_size=size, patch_size=2,
        caption_channels=cap, cross_attention_dim=heads * hd,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "hidden_states": torch.randn(2, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(2, text, cap, generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    desc = (f"PixArt-like DiT: {layers} blocks (self + cross attention), hidden {heads * hd} = {heads} heads x {hd}, "
            f"latent 4x{size}x{size} -> {(size // 2) ** 2} image tokens, {text} text tokens, batch 2, fp32")
    return model, inputs, desc


def make_step(model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    """One Euler step of the latent: model call and update in one function (what run_steps needs)."""
    def step(x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        v = model(**inputs, hidden_states=x, timestep=t, return_dict=False)[0]
        return x + dt * v[:, : x.shape[1]]

    return step


def schedule(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(timestep, step size) per step; the timestep goes down as in a sampler."""
    return [(torch.full((2,), 999 - s * (999 // steps), dtype=torch.long), torch.tensor(-1.0 / steps))
            for s in range(steps)]


def _loop(step: Any, x: torch.Tensor, steps: list[Any]) -> tuple[list[float], torch.Tensor]:
    """Per-step seconds (until the slowest rank is done) and the last latent."""
    times = []
    for args in steps:
        dist.barrier()
        start = time.perf_counter()
        x = step(x, *args)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times, x


def job(quick: bool, steps: int, inner: str) -> dict[str, Any]:
    """One rank: the single-rank reference, then every method; per-step bytes, times and bubble."""
    from xdit_compile import pipefusion
    from xdit_compile.runtime.collectives import record_collectives

    torch.set_num_threads(1)
    rank = dist.get_rank()
    model, inputs, desc = build(quick)
    x0 = inputs.pop("hidden_states")
    plan = schedule(steps)
    with torch.no_grad():
        _loop(make_step(model, inputs), x0, plan[:2])  # warm the allocator and kernels, as the compile call does
        ref_times, ref = _loop(make_step(model, inputs), x0, plan)
    rows = [{"method": "single rank", "step": statistics.mean(ref_times[1:]), "p2p": 0, "coll": 0, "err": 0.0,
             "params": None, "bubble": None}]
    for name, options, streamed in METHODS:
        torch._dynamo.reset()
        pipefusion.reset()
        pipefusion.clear_reports()
        model, inputs, _ = build(quick)
        x0 = inputs.pop("hidden_states")
        step = torch.compile(make_step(model, inputs), backend="xdit", dynamic=False,
                             options={"inner": inner, **options})
        with torch.no_grad():
            _loop(step, x0, plan[:1])  # compile (and PipeFusion's first warmup step)
            pipefusion.reset()  # a new generation: W = 1 warmup step again, then stale K/V
            reps = pipefusion.reports()
            seen = len(reps[-1].driver.timings) if reps else 0
            with pipefusion.record_p2p() as p2p, record_collectives() as coll:
                dist.barrier()
                start = time.perf_counter()
                if streamed:
                    out = pipefusion.run_steps(step, x0, plan)
                else:
                    times, out = _loop(step, x0, plan)
                dist.barrier()
                total = time.perf_counter() - start
        timings = reps[-1].driver.timings[seen + 1:] if reps else []  # the calls after the warmup step
        if streamed:
            per_step = timings[-1].wall / (steps - 1)
        else:
            per_step = statistics.mean(times[1:])
        sent = sum(r.nbytes for r in p2p if r.kind == "send" or (r.kind == "broadcast" and r.peer == rank))
        rows.append({
            "method": name, "step": per_step, "total": total, "p2p": sent / steps,
            "coll": sum(c.nbytes for c in coll) / steps, "err": float((out - ref).abs().max() / ref.abs().max()),
            "params": (reps[-1].param_bytes, reps[-1].param_bytes_total) if reps else None,
            "bubble": 1 - sum(t.compute for t in timings) / sum(t.wall for t in timings) if timings else None,
        })
    return {"desc": desc, "rows": rows}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per method, the largest bytes and step time over the ranks, each rank's bubble."""
    lines = ["| method | bytes sent / step / rank | of which P2P + output | of which collectives | "
             "step latency (ms, mean of steady steps) | speedup | bubble (rank 0 / rank 1) | "
             "parameters kept (rank 0 / rank 1) | err |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = None
    for i, _ in enumerate(results[0]["rows"]):
        per_rank = [r["rows"][i] for r in results]
        p2p = max(r["p2p"] for r in per_rank)
        coll = max(r["coll"] for r in per_rank)
        total = max(r["p2p"] + r["coll"] for r in per_rank)
        ms = max(r["step"] for r in per_rank) * 1e3  # a step ends when the slowest rank does
        base = base or ms
        params = "all"
        if per_rank[0]["params"]:
            params = " / ".join(f"{r['params'][0] / r['params'][1]:.0%}" for r in per_rank)
        bubble = " / ".join(f"{r['bubble']:.0%}" for r in per_rank) if per_rank[0]["bubble"] is not None else "-"
        err = max(r["err"] for r in per_rank)
        lines.append(f"| {per_rank[0]['method']} | {total / 1e3:,.1f} kB | {p2p / 1e3:,.1f} kB | {coll / 1e3:,.1f} kB "
                     f"| {ms:,.1f} | {base / ms:.2f}x | {bubble} | {params} | {err:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny test model")
    p.add_argument("--steps", type=int, default=12, help="steps per method (the first is PipeFusion's warmup)")
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "pipefusion.md"))
    args = p.parse_args()
    from benchmarks.pipefusion_bench import job as rank_job  # importable by the spawned ranks
    from xdit_compile.testing import run_spmd

    start = time.perf_counter()
    results = run_spmd(rank_job, 2, args.quick, args.steps, args.inner, timeout=3600.0)
    md = table(results)
    import platform

    text = "\n".join([
        "# PipeFusion vs Ulysses vs Ring (2 ranks)",
        "",
        f"Generated by `python benchmarks/pipefusion_bench.py{' --quick' if args.quick else ''}` "
        f"({time.perf_counter() - start:.0f} s): {results[0]['desc']}.",
        f"2 gloo ranks on CPU ({platform.machine()}, 1 thread per rank), inner compiler {args.inner}, "
        f"{args.steps} steps per method (the first, PipeFusion's warmup, is not counted in the latency).",
        "Bytes: what a rank hands to the network per step, largest over the ranks "
        "(P2P sends between stages + the output broadcast; collectives: all-to-all, ring shift, gathers).",
        "Bubble: the share of a PipeFusion rank's wall time (steady steps) spent outside its stage programs "
        "(waiting for the other stage, transfers, the output broadcast). `run_steps` keeps the pipeline full "
        "across steps (one fill and one drain per run instead of per step); the others call the compiled step "
        "once per step.",
        "",
        md,
        "",
    ])
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
