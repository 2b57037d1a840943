"""Bytes and FLOPs of attention spelled out (matmul, einsum, baddbmm, ...) against hand-written SDPA.

    python benchmarks/spelled_attention.py

``examples/tiny_dits_spelled.py`` builds one DiT whose attention is written in each form with the
same weights; its ``sdpa`` form is the hand-written baseline (what xDiT's Ulysses/Ring processors
compute). Each form is compiled with backend "xdit" under Ulysses 2 and Ring 2 (2 gloo ranks) and
Ulysses 4 and USP 2x2 (4 ranks). Reported per (plan, form), rank 0: bytes handed to collectives
per forward and their ratio to the baseline's, per-rank FLOPs as a fraction of one rank's eager
run, and the error against one rank (relative to the output's scale). Bytes and FLOPs are exact
counts, not timings, so one run suffices.

Prints a Markdown table and writes ``benchmarks/results/spelled_attention.md``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from xdit_compile.testing.harness import run_spmd  # noqa: E402
from xdit_compile.testing.parity import parity_job  # noqa: E402

FACTORY = "examples.tiny_dits_spelled:make"
FORMS = ["sdpa", "matmul", "einsum", "baddbmm", "inplace", "fp32"]
PLANS = {2: {"Ulysses 2": {"ulysses_degree": 2}, "Ring 2": {"ring_degree": 2}},
         4: {"Ulysses 4": {"ulysses_degree": 4}, "USP 2x2": {"ulysses_degree": 2, "ring_degree": 2}}}


def _job(plans: dict[str, dict[str, Any]]) -> list[tuple[str, str, int, float, float]]:
    rows = []
    for plan, options in plans.items():
        for form in FORMS:
            r = parity_job(FACTORY, form, {**options, "inner": "eager"})
            rows.append((plan, form, sum(b for _, b, _ in r.collectives), r.flops / r.ref_flops, r.rel_err))
    return rows


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    lines = ["| plan | form | bytes per forward (rank 0) | bytes / SDPA baseline | per-rank FLOPs / one rank | rel. error |",
             "|---|---|---|---|---|---|"]
    for world, plans in PLANS.items():
        rows = run_spmd(_job, world, plans, timeout=1800)[0]
        base = {plan: b for plan, form, b, _, _ in rows if form == "sdpa"}
        for plan, form, b, flops, err in rows:
            lines.append(f"| {plan} | {form} | {b} | {b / base[plan]:.2f} | {flops:.3f} | {err:.1e} |")
    text = "\n".join(lines)
    print(text)
    out = os.path.join(ROOT, "benchmarks", "results", "spelled_attention.md")
    with open(out, "w") as f:
        f.write("# Spelled-out attention against hand-written SDPA (`benchmarks/spelled_attention.py`)\n\n"
                "Tiny DiT of `examples/tiny_dits_spelled.py` (latent 2x4x16x16, 64 tokens, hidden 64 = 4 heads x 16, "
                "2 blocks of self + masked cross attention), CPU gloo, rank 0.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
