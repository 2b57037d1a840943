"""Spatial-temporal DiTs (``examples/tiny_dits_st.py``) on 2 ranks: DSP found by the plan search.

OpenSora-style (spatial then temporal attention in every block) and Latte-style (alternating
blocks) models, compiled without annotations under Ulysses 2 and Ring 2: every attention must
run local (frames sharded for the within-frame attention, positions for the across-frames one),
the only collectives inside the model must be one all-to-all of the activation at each switch
(two per spatial + temporal pair), bytes within 1.10x of DSP's two activation all-to-alls, and
the result exact against one rank. ``opensora_marked`` writes the switch by hand
(``xdit_compile.shard``): the search must find a plan that moves no more than that one.
One spawn runs every case.
"""

from __future__ import annotations

from collections import Counter

import pytest

from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_job

FACTORY = "examples.tiny_dits_st:make"
U2 = {"ulysses_degree": 2, "inner": "eager"}
R2 = {"ring_degree": 2, "inner": "eager"}
CASES = [("opensora", U2), ("latte", U2), ("opensora_marked", U2), ("opensora", R2)]
PAIRS = 2  # spatial + temporal attention pairs in each model (depth 2)
# One activation (B, T, S, D) = (2, 8, 64, 64) float32 on one of 2 ranks.
LOCAL_ACTIVATION = 2 * 8 * 64 * 64 * 4 // 2
OUTPUT_GATHER = 2 * 4 * 8 * 16 * 16 * 4 // 2
TOL = 1e-5


def _job() -> list[ParityResult]:
    return [parity_job(FACTORY, name, options) for name, options in CASES]


_cache: list[list[ParityResult]] = []


def _results() -> list[list[ParityResult]]:
    if not _cache:
        _cache.extend(run_spmd(_job, 2, timeout=600))
    return _cache


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}-{'ring' if o is R2 else 'ulysses'}" for n, o in CASES])
def test_dsp_found_by_search(case: int) -> None:
    name, _ = CASES[case]
    for results in _results():
        r = results[case]
        assert r.fallback is None, f"{name} rank {r.rank} fell back: {r.fallback}\n{r.report}"
        assert r.rel_err < TOL, f"{name} rank {r.rank}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"
        assert r.report.count("-> local") == 2 * PAIRS and "ulysses (" not in r.report and "ring (" not in r.report, r.report
        kinds = Counter(kind for kind, _, _ in r.collectives)
        assert kinds == {"all_to_all": 2 * PAIRS, "all_gather": 1}, f"{name}: {dict(kinds)}\n{r.report}"
        moved = sum(nb for kind, nb, _ in r.collectives if kind == "all_to_all")
        dsp = 2 * LOCAL_ACTIVATION * PAIRS
        assert moved <= 1.10 * dsp, f"{name}: {moved} bytes in all-to-alls against DSP's {dsp}\n{r.report}"
        assert sum(nb for kind, nb, _ in r.collectives if kind == "all_gather") == OUTPUT_GATHER
        assert r.flops < 0.55 * r.ref_flops, f"{name}: {r.flops} FLOPs vs {r.ref_flops} on one rank"


def test_search_moves_no_more_than_the_hand_written_switch() -> None:
    for results in _results():
        auto, marked = results[0], results[2]
        assert sum(nb for _, nb, _ in auto.collectives) <= sum(nb for _, nb, _ in marked.collectives)
        assert "activation" in auto.report and "activation" not in marked.report
