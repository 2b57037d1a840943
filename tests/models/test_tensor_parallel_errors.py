"""Tensor parallel where the degree does not divide: the plan still works and says why.

PixArt with 3 heads under TP 2 on 2 ranks (inner eager), run in test_tensor_parallel.py's spawn. The attention projections
stay whole (the report names the heads and the fix), the MLPs still split; the output matches
single-rank eager within 1e-4 of its scale. Plus the plan errors, without a spawn.
"""

from __future__ import annotations

import pytest

from tests.models.test_tensor_parallel import TOL, TpResult, _results as _tp_results
from xdit_compile import ParallelPlan, PlanError


def _results() -> list[list[TpResult]]:
    return [[per_rank[-1]] for per_rank in _tp_results()]  # UNEVEN runs last in that spawn


def test_heads_the_degree_does_not_divide_stay_whole_and_reported() -> None:
    for (r,) in _results():
        assert r.rel_err < TOL, f"rank {r.rank}: rel err {r.rel_err}\n{r.report}"
        assert "its 3 heads do not split over 2 ranks" in r.report, r.report
        assert "tensor_parallel_degree that divides 3" in r.report, r.report
        ratio = r.block_bytes / r.block_bytes_whole
        assert 0.55 < ratio < 0.9, f"rank {r.rank}: the MLPs should still split ({ratio:.3f}x)\n{r.report}"


def test_tp_option_and_plan_errors() -> None:
    plan = ParallelPlan.from_options({"tensor_parallel_degree": 2, "ulysses_degree": 2})
    assert (plan.tp, plan.ulysses, plan.world_size) == (2, 2, 4)
    assert plan.resolve(4).describe() == "ulysses=2 x tp=2"
    with pytest.raises(PlanError, match="pipefusion_parallel_degree"):
        ParallelPlan.from_options({"tensor_parallel_degree": 2, "pipefusion_parallel_degree": 2})
    with pytest.raises(PlanError, match="tensor_parallel_degree"):
        ParallelPlan.from_options({"tensor_parallel_degree": 0})
    with pytest.raises(PlanError, match="do not multiply to the world size"):
        ParallelPlan.from_options({"tensor_parallel_degree": 2}).resolve(4)
