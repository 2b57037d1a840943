"""Every core tiny diffusers DiT, under every exact plan, against its single-rank eager output.

One spawn per plan runs all models (process start-up dominates otherwise). Exact methods must
match within 1e-4 of the output's scale on every rank, split the work (FLOPs per rank well
below one rank's), and issue only the collectives the plan implies.
"""

from __future__ import annotations

import pytest

from examples.tiny_dits import ZOO
from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_many

FACTORY = "examples.tiny_dits:make"
MODELS = list(ZOO)
TOL = 1e-4

# (world size, options, max per-rank FLOPs as a fraction of one rank's)
PLANS = {
    "ulysses2": (2, {"ulysses_degree": 2}, 0.62),
    "ring2": (2, {"ring_degree": 2}, 0.62),
    "usp2x2": (4, {"ulysses_degree": 2, "ring_degree": 2}, 0.40),
    "cfg2": (2, {"use_cfg_parallel": True}, 0.55),
    "cfg2_ulysses2": (4, {"use_cfg_parallel": True, "ulysses_degree": 2}, 0.35),
}

_cache: dict[str, list[list[ParityResult]]] = {}


def _run(plan: str) -> list[list[ParityResult]]:
    if plan not in _cache:
        world, options, _ = PLANS[plan]
        _cache[plan] = run_spmd(parity_many, world, FACTORY, MODELS, {**options, "inner": "eager"}, timeout=900)
    return _cache[plan]


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", MODELS)
def test_matches_single_rank(plan: str, model: str) -> None:
    per_rank = _run(plan)
    i = MODELS.index(model)
    for results in per_rank:
        r = results[i]
        assert r.fallback is None, f"{model}/{plan} rank {r.rank} fell back: {r.fallback}"
        assert r.rel_err < TOL, f"{model}/{plan} rank {r.rank}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", MODELS)
def test_work_is_split(plan: str, model: str) -> None:
    limit = PLANS[plan][2]
    for results in _run(plan):
        r = results[MODELS.index(model)]
        assert r.flops < limit * r.ref_flops, (
            f"{model}/{plan} rank {r.rank}: {r.flops} FLOPs vs {r.ref_flops} on one rank\n{r.report}")


# Spatial-temporal: the plan search switches the sharded dim (frames <-> positions) with one
# all-to-all of the activation, and every attention runs local (DSP; docs/redistribution.md).
SWITCHED = {"latte"}


@pytest.mark.parametrize("model", MODELS)
def test_ulysses_collectives(model: str) -> None:
    """Ulysses: per sequence-sharded attention, q/k/v in and out through all-to-all; one gather."""
    r = _run("ulysses2")[0][MODELS.index(model)]
    kinds = [kind for kind, _, _ in r.collectives]
    if model in SWITCHED:
        switches = r.report.count("all_to_all at ")
        assert "-> ulysses" not in r.report and switches > 0 and kinds.count("all_to_all") == switches, r.report
        assert kinds.count("all_gather") == 1 and set(kinds) <= {"all_to_all", "all_gather"}, (kinds, r.report)
        return
    lowered = r.report.count("-> ulysses")
    assert lowered > 0, r.report
    assert kinds.count("all_to_all") == 2 * lowered, (kinds, r.report)
    assert kinds.count("all_gather") == 1, (kinds, r.report)  # the output, as a hand-written Ulysses
    assert set(kinds) <= {"all_to_all", "all_gather"}, kinds


@pytest.mark.parametrize("model", MODELS)
def test_cfg_only_gathers_output(model: str) -> None:
    r = _run("cfg2")[0][MODELS.index(model)]
    assert [kind for kind, _, _ in r.collectives] == ["all_gather"], r.collectives
