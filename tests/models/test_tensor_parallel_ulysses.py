"""TP 2 x Ulysses 2 on 4 ranks (one spawn, inner eager): ``tp`` is lowered after ``sp``, so the
token shards' features are split; the Ulysses attention splits this rank's heads further.

Checks on every rank: parity with single-rank eager within 1e-4 of the scale, and block
parameters kept at most 0.55x of one rank's (the Ulysses group holds the same weight halves).
"""

from __future__ import annotations

import pytest

from tests.models.test_tensor_parallel import MAX_BLOCK_PARAMS, TOL, TpResult, _tp_job
from xdit_compile.testing.harness import run_spmd

MODELS = [("examples.tiny_dits:make", "pixart"), ("examples.tiny_dits:make", "sd3"), ("examples.tiny_dits:make", "flux")]

_cache: list[list[TpResult]] = []


def _results() -> list[list[TpResult]]:
    if not _cache:
        _cache.extend(run_spmd(_tp_job, 4, MODELS, {"tensor_parallel_degree": 2, "ulysses_degree": 2, "inner": "eager"},
                               timeout=900))
    return _cache


@pytest.mark.parametrize("model", [m for _, m in MODELS])
def test_tp2_ulysses2_matches_single_rank(model: str) -> None:
    names = [m for _, m in MODELS]
    for results in _results():
        r = results[names.index(model)]
        assert r.rel_err < TOL, f"{model} rank {r.rank}: rel err {r.rel_err}\n{r.report}"
        assert "all_to_all" in r.kinds, f"{model} rank {r.rank}: no Ulysses all-to-all ({r.kinds})\n{r.report}"
        ratio = r.block_bytes / r.block_bytes_whole
        assert ratio <= MAX_BLOCK_PARAMS, f"{model} rank {r.rank}: block params {ratio:.3f}x of one rank's\n{r.report}"
