"""Tensor parallel composed with the other axes on 4 ranks (one spawn, inner eager): TP 2 x Ring 2,
TP 2 x CFG 2 and TP 2 x data parallel 2, on PixArt and Flux (``examples/tiny_dits.py``).

``tp`` is the innermost mesh dimension and is lowered last (docs/tensor_parallel.md): Ring splits
the tokens, CFG / data parallel the batch, then ``tp`` the features of what each rank holds. On
every rank: parity with single-rank eager within 1e-4 of the scale, block parameters at most 0.55x
of one rank's, and the tp group's all-reduce present next to the other axis's own collective.
"""

from __future__ import annotations

import pytest

from tests.models.test_tensor_parallel import MAX_BLOCK_PARAMS, TOL, TpResult, _tp_job
from xdit_compile.testing.harness import run_spmd

MODELS = [("examples.tiny_dits:make", "pixart"), ("examples.tiny_dits:make", "flux")]
# plan -> (options, a collective kind the other axis must issue)
PLANS = {
    "tp2_ring2": ({"tensor_parallel_degree": 2, "ring_degree": 2}, "shift"),
    "tp2_cfg2": ({"tensor_parallel_degree": 2, "use_cfg_parallel": True}, "all_gather"),
    "tp2_dp2": ({"tensor_parallel_degree": 2, "data_parallel_degree": 2}, "all_gather"),
}

_cache: dict[str, list[list[TpResult]]] = {}


def _job(plans: dict) -> dict[str, list[TpResult]]:
    return {plan: _tp_job(MODELS, {**options, "inner": "eager"}) for plan, (options, _) in plans.items()}


def _results() -> dict[str, list[list[TpResult]]]:
    if not _cache:
        per_rank = run_spmd(_job, 4, PLANS, timeout=900)
        _cache.update({plan: [r[plan] for r in per_rank] for plan in PLANS})
    return _cache


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", [m for _, m in MODELS])
def test_tp2_composes_with_the_other_axes(plan: str, model: str) -> None:
    names = [m for _, m in MODELS]
    other = PLANS[plan][1]
    for results in _results()[plan]:
        r = results[names.index(model)]
        assert r.rel_err < TOL, f"{model}/{plan} rank {r.rank}: rel err {r.rel_err}\n{r.report}"
        ratio = r.block_bytes / r.block_bytes_whole
        assert ratio <= MAX_BLOCK_PARAMS, f"{model}/{plan} rank {r.rank}: block params {ratio:.3f}x\n{r.report}"
        assert "all_reduce" in r.kinds and other in r.kinds, f"{model}/{plan} rank {r.rank}: {r.kinds}\n{r.report}"
