"""DiT blocks whose attention is one opaque call (``tests/adversarial/kernel_models.py``):
nn.MultiheadAttention batch-first and sequence-first, flash_attn_func, flash_attn_varlen_func
(one sequence per sample) and xformers memory_efficient_attention (CPU stand-ins under the real
op names); and a varlen call over sequences of different lengths, which must stay replicated,
exact, with its reason in the report. Two spawns in all: Ulysses 2 and Ring 2 on 2 ranks in one, USP 2x2 on 4 ranks in the
other. Every model must match one rank (exact: within 1e-4 of the output's scale on every rank),
lower its self-attention to the plan's sequence-parallel attention, name the form it found, and
split the work: per-rank FLOPs at most 0.55 of one rank's on 2 ranks, 0.30 on 4.

FLOPs are torch's counter's: linears and convolutions. SDPA's CPU kernel has no FLOP formula, so
attention itself is counted neither in the reference nor per rank (the stand-ins count nothing
either), except xformers' tensor-bias path, whose ATen op has one in the reference only.
"""

from __future__ import annotations

import pytest

from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_many

FACTORY = "tests.adversarial.kernel_models:make"
FORMS = {"mha_batch_first": "attention:mha", "mha_seq_first": "attention:mha_separate_proj",
         "flash_attn": "attention:flash_attn", "flash_attn_varlen": "attention:flash_attn_varlen",
         "xformers": "attention:xformers_flash"}
RAGGED = "flash_attn_varlen_ragged"  # left as written: exact and replicated, with the reason reported
MODELS = list(FORMS) + [RAGGED]
TOL = 1e-4
PLANS = {  # plan -> (options, world size, how self-attention is lowered, max per-rank FLOPs)
    "ulysses2": ({"ulysses_degree": 2, "inner": "eager"}, 2, "-> ulysses", 0.55),
    "ring2": ({"ring_degree": 2, "inner": "eager"}, 2, "-> ring", 0.55),
    "usp2x2": ({"ulysses_degree": 2, "ring_degree": 2, "inner": "eager"}, 4, "-> usp", 0.30),
}

_cache: dict[int, list[dict[str, list[ParityResult]]]] = {}


def _plans_job(plans: list[str]) -> dict[str, list[ParityResult]]:
    """One rank: every model under every plan of this world size (one spawn)."""
    return {p: parity_many(FACTORY, MODELS, PLANS[p][0]) for p in plans}


def _results(world: int) -> list[dict[str, list[ParityResult]]]:
    if world not in _cache:
        plans = [p for p, spec in PLANS.items() if spec[1] == world]
        _cache[world] = run_spmd(_plans_job, world, plans, timeout=900)
    return _cache[world]


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", list(FORMS))
def test_kernel_model_parallel_and_exact(model: str, plan: str) -> None:
    _, world, lowered, max_flops = PLANS[plan]
    for per_rank in _results(world):
        r = per_rank[plan][MODELS.index(model)]
        where = f"{model} under {plan}, rank {r.rank}"
        assert r.fallback is None, f"{where} fell back: {r.fallback}\n{r.report}"
        assert r.rel_err < TOL, f"{where}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"
        assert FORMS[model] in r.report, f"{where}: form {FORMS[model]} not reported\n{r.report}"
        assert lowered in r.report, f"{where}: self-attention not lowered ({lowered})\n{r.report}"
        assert r.flops <= max_flops * r.ref_flops, (
            f"{where}: {r.flops} FLOPs per rank vs {r.ref_flops} on one rank (max {max_flops})\n{r.report}")


def test_ragged_varlen_runs_replicated_with_a_reason() -> None:
    why = "left:flash_attn_varlen (sequences of different lengths"
    for per_rank in _results(2):
        r = per_rank["ulysses2"][MODELS.index(RAGGED)]
        assert r.fallback is None and r.rel_err < TOL, f"rank {r.rank}: {r.max_abs_err} / {r.scale}\n{r.report}"
        assert why in r.report and "attention kernel flash_attn_varlen left as written" in r.report, r.report
