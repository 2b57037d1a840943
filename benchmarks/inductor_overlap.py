"""Inductor's communication reordering (option ``reorder_comms``) on vs off, 2 ranks, one invocation.

    .venv/bin/python benchmarks/inductor_overlap.py [--rounds 7] [--methods ulysses,ring] [--out FILE]

For each method (Ulysses 2, Ring 2) both ranks compile the same model twice with inner inductor,
``reorder_comms=False`` and ``reorder_comms=True`` (``xdit_compile/inner_overlap.py``), then call
the two programs in alternation (round i runs off/on, round i + 1 on/off, so that a shared machine's
load hits both alike), ``--rounds`` times each, and takes the median of the slower rank per round.

Also recorded, from inductor's generated code of rank 0 (``run_and_get_code``): for every
collective, how many kernels run between it and its ``wait_tensor`` ("overlap slots"), which is
what the reordering changes; and each program's max abs error against one rank's eager model.

Shape ("medium"): a PixArtTransformer2DModel (random weights, from its config) with hidden 256 = 8
heads x 32, 2 layers, a 4x64x64 latent = 1,024 image tokens, 32 text tokens, batch 2, float32, one
thread per rank, gloo. Writes a markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEDIUM = dict(heads=8, head_dim=32, layers=2, side=64, text=32, batch=2)
def build(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    hidden = spec["heads"] * spec["head_dim"]
    model = PixArtTransformer2DModel(
        num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"], in_channels=4, out_channels=8,
        num_layers=spec["layers"], norm_type="ada_norm_single", use_additional_conditions=False,
        sample_size=spec["side"], patch_size=2, caption_channels=hidden, cross_attention_dim=hidden,
    ).eval()
    g = torch.Generator().manual_seed(1)
    b = spec["batch"]
    inputs = {
        "hidden_states": torch.randn(b, 4, spec["side"], spec["side"], generator=g),
        "encoder_hidden_states": torch.randn(b, spec["text"], hidden, generator=g),
        "timestep": torch.tensor([500] * b),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return model, inputs


def job(spec: dict[str, Any]) -> dict[str, Any]:
    """What one rank runs: compile off and on, then ``spec['rounds']`` alternating rounds."""
    import torch
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code

    import xdit_compile  # noqa: F401  (registers the backend)
    from xdit_compile.inner_overlap import overlap_slots

    model, inputs = build(spec)
    with torch.no_grad():
        ref = model(**inputs)[0]
    programs, slots, errors, compile_s = {}, {}, {}, {}
    for on in (False, True):
        name = "on" if on else "off"
        compiled = torch.compile(model, backend="xdit",
                                 options={**spec["options"], "inner": "inductor", "reorder_comms": on})
        start = time.perf_counter()
        with torch.no_grad():
            out, codes = run_and_get_code(lambda: compiled(**inputs))
        compile_s[name] = time.perf_counter() - start
        programs[name] = compiled
        slots[name] = [s for code in codes for s in overlap_slots(code)]
        errors[name] = float((out[0] - ref).abs().max())
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    outs = {}
    with torch.no_grad():
        for name in ("off", "on"):  # untimed: a first call may still switch between the two programs' caches
            programs[name](**inputs)
        for i in range(spec["rounds"]):
            for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                outs[name] = programs[name](**inputs)[0]
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    return {"rank": dist.get_rank(), "times": times, "cpu": cpu, "slots": slots, "err": errors,
            "on_vs_off": float((outs["on"] - outs["off"]).abs().max()), "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--methods", default="ulysses,ring")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inductor_overlap.md"))
    args = parser.parse_args()
    from xdit_compile.testing import run_spmd

    options = {"ulysses": {"ulysses_degree": 2}, "ring": {"ring_degree": 2}}
    s = MEDIUM
    lines = [
        "# Inductor's communication reordering on vs off, 2 ranks (`benchmarks/inductor_overlap.py`)",
        "",
        f"Medium PixArt shape: hidden {s['heads'] * s['head_dim']} = {s['heads']} heads x {s['head_dim']}, "
        f"{s['layers']} layers, {(s['side'] // 2) ** 2} image tokens, {s['text']} text tokens, batch {s['batch']}, "
        f"float32, inner inductor, gloo, 1 thread per rank; {args.rounds} alternating rounds per setting "
        "(off/on, then on/off), median of the slower rank per round. `reorder_comms` patches inductor's config "
        "for this backend's inner compiles only (passes: `sink_waits`, `raise_comms`).",
        "",
        "| method | reorder_comms | median wall s | wall ratio on/off | median CPU s (2 ranks) | max abs err vs one rank "
        "| on vs off max abs diff | kernels between each collective and its wait (rank 0) | rounds, wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods.split(","):
        spec = {**s, "rounds": args.rounds, "options": options[method]}
        load_before = os.getloadavg()
        results = run_spmd(job, 2, spec, timeout=3600, env={"OMP_NUM_THREADS": "1"})
        load_after = os.getloadavg()
        per_round = {n: [max(r["times"][n][i] for r in results) for i in range(args.rounds)] for n in ("off", "on")}
        med = {n: statistics.median(v) for n, v in per_round.items()}
        cpu = {n: statistics.median(sum(r["cpu"][n][i] for r in results) for i in range(args.rounds))
               for n in ("off", "on")}
        for n in ("off", "on"):
            slots = ", ".join(f"{k} {c}" for k, c in results[0]["slots"][n])
            lines.append(
                f"| {method} 2 | {n} | {med[n]:.3f} | {med[n] / med['off']:.3f} | {cpu[n]:.3f} | "
                f"{max(r['err'][n] for r in results):.2e} | {max(r['on_vs_off'] for r in results):.1e} | {slots} | "
                f"{', '.join(f'{t:.3f}' for t in per_round[n])} |")
        lines.append(f"| | load avg before {tuple(round(x, 1) for x in load_before)}, after "
                     f"{tuple(round(x, 1) for x in load_after)} | compile s (rank 0) off "
                     f"{results[0]['compile_s']['off']:.0f}, on {results[0]['compile_s']['on']:.0f} | | | | | | |")
        print("\n".join(lines[-3:]), flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
