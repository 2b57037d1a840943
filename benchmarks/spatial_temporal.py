"""DSP found by the plan search against Ulysses-only, on the same spatial-temporal models.

    python benchmarks/spatial_temporal.py            # 2 ranks, realistic-ish shape (~1 min)
    python benchmarks/spatial_temporal.py --quick    # the tiny test shape, 2 timed runs

Models: ``examples/tiny_dits_st.py`` (OpenSora-style: spatial + temporal attention per block;
Latte-style: alternating blocks). Each is compiled twice with backend "xdit", Ulysses 2, inner
eager, on 2 gloo ranks: once as the search plans it (DSP: one all-to-all of the activation at each
switch, all attention local) and once with the switch seeds off (``passes/switch_seeds.py``
patched out in this process only: frames sharded, the across-frames attention lowered to Ulysses),
both from the same captured graph; one rank runs that graph as it is, in the same alternation.
Reported per model, rank 0: bytes handed to collectives per spatial + temporal pair and their
ratio to DSP's two activation all-to-alls, bytes a rank receives (``benchmarks.analytic``),
median latency of each over alternating runs and their ratio, one rank's eager latency, and the
error against one rank. Writes ``benchmarks/results/spatial_temporal.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from xdit_compile.testing.harness import run_spmd  # noqa: E402

MODELS = ["opensora", "latte"]
FULL = {"frames": 16, "size": 32, "dim": 128, "heads": 4, "depth": 2}  # 16 frames x 256 positions
QUICK = {"frames": 8, "size": 16, "dim": 64, "heads": 4, "depth": 2}


def _job(shape: dict[str, int], runs: int) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from benchmarks.analytic import received_bytes
    from examples.tiny_dits_st import make
    from xdit_compile.runtime.collectives import record_collectives

    from xdit_compile.backend import xdit_backend

    n = dist.get_world_size()
    options = {"ulysses_degree": n, "inner": "eager"}
    rows = []
    for name in MODELS:
        model, inputs = make(name, **shape)
        captured: list[Any] = []

        def capture(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
            captured.append((gm, list(example_inputs)))
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            ref = model(**inputs, return_dict=False)[0]
            torch.compile(model, backend=capture, fullgraph=True)(**inputs, return_dict=False)
            gm, args = captured[0]
            # The same captured graph planned twice: as the search plans it, and with switch seeds off.
            variants = {"dsp": xdit_backend(copy.deepcopy(gm), args, options=dict(options))}
            with mock.patch("xdit_compile.passes.choose_seeds.add_switch_seeds", lambda gm, n, b, best, forced=None: best):
                variants["ulysses"] = xdit_backend(copy.deepcopy(gm), args, options=dict(options))
            variants["one rank"] = gm.forward
            stats: dict[str, dict[str, Any]] = {}
            for key, fn in variants.items():
                fn(*args)
                with record_collectives() as log:
                    out = fn(*args)
                out = out[0] if isinstance(out, (tuple, list)) else out
                stats[key] = {"handed": sum(r.nbytes for r in log if r.kind != "all_gather"),
                              "received": sum(received_bytes(r.kind, r.nbytes, r.group_size) for r in log
                                              if r.kind != "all_gather"),
                              "err": float((out - ref).abs().max() / ref.abs().max()), "times": []}
            for _ in range(runs):  # alternating, so load on the machine hits every variant alike
                for key, fn in variants.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn(*args)
                    stats[key]["times"].append(time.perf_counter() - t0)
        b, t, s, d = 2, shape["frames"], (shape["size"] // 2) ** 2, shape["dim"]
        local_activation = b * t * s * d * 4 // n
        rows.append({"model": name, "one_rank": statistics.median(stats.pop("one rank")["times"]),
                     "pairs": shape["depth"], "activation": local_activation,
                     **{f"{k}_{f}": (statistics.median(v["times"]) if f == "time" else v[f])
                        for k, v in stats.items() for f in ("handed", "received", "err", "time")}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test shape and 2 timed runs")
    parser.add_argument("--runs", type=int, default=7, help="alternating timed runs per variant")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shape = QUICK if args.quick else FULL
    rows = run_spmd(_job, 2, shape, 2 if args.quick else args.runs, timeout=1800)[0]
    lines = ["| model | plan | bytes handed per pair (rank 0) | / DSP's 2 activation all-to-alls | bytes received "
             "per pair | median latency | Ulysses-only / DSP latency | one rank eager | rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dsp = 2 * r["activation"]
        for key, label in (("dsp", "DSP by search"), ("ulysses", "Ulysses only")):
            handed, received = r[f"{key}_handed"] / r["pairs"], r[f"{key}_received"] / r["pairs"]
            ratio = r["ulysses_time"] / r["dsp_time"]
            lines.append(f"| {r['model']} | {label} | {handed:.0f} | {handed / dsp:.2f} | {received:.0f} | "
                         f"{1e3 * r[f'{key}_time']:.1f} ms | {ratio:.2f}x | {1e3 * r['one_rank']:.1f} ms | "
                         f"{r[f'{key}_err']:.1e} |")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        out = os.path.join(ROOT, "benchmarks", "results", "spatial_temporal.md")
        with open(out, "w") as f:
            f.write("# DSP by search against Ulysses-only (`benchmarks/spatial_temporal.py`)\n\n"
                    f"Models of `examples/tiny_dits_st.py` at {shape}, batch 2, float32; Ulysses 2 on 2 gloo ranks "
                    "(1 thread each), inner eager; bytes exclude the final output gather (the same in both). "
                    "Latency: medians over alternating runs in one invocation.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
