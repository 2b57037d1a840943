"""PipeFusion's steps run as passes (``pipefusion:stages`` / ``patches`` / ``full``) on the pass manager:
disabling ``pipefusion:patches`` runs the exact pipeline (M = 1) and says so. One spawn of 2 gloo ranks."""

from __future__ import annotations

from tests.pipefusion.jobs import EXACT, pipeline_job
from xdit_compile.testing.harness import run_spmd


def test_patches_disabled_runs_the_exact_pipeline() -> None:
    case = ("pixart", {"pipefusion_parallel_degree": 2, "num_pipeline_patch": 2, "warmup_steps": 1}, 3, 1)
    for per_rank in run_spmd(pipeline_job, 2, [case], timeout=600, env={"XDIT_DISABLE_PASSES": "pipefusion:patches"}):
        r = per_rank[0]
        assert r["err"] / r["scale"] < EXACT, (r["err"], r["scale"], r["report"])  # no stale K/V: exact
        assert r["patches"] == 1 and all(full for _, _, full in r["calls"]), r["calls"]
        assert any("pipefusion:patches is disabled" in n for n in r["notes"]), r["notes"]
