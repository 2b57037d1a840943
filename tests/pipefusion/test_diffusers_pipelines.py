"""PipeFusion under real diffusers pipelines (2 gloo ranks, one spawn for every case).

The tiny pipelines of ``examples/tiny_pipelines.py`` (random transformer and VAE, prompt
embeddings passed in), 8 steps, only the transformer compiled, inner compiler "eager":

* PixArt-Sigma (DPM-Solver) and SD3 (flow-matching Euler) batch the CFG halves into one
  transformer call per step: one stream.
* Flux with true CFG (``true_cfg_scale`` > 1 and a negative prompt) calls the transformer twice
  per step, conditional then unconditional: two streams of the same step, each with its own
  K/V buffers.

Exact (fp32, within 1e-4 of the image's scale): M = 1, or warmup covering every step.
Approximate: W = 1 and M = 2, 4: within ``STALE_BOUND`` of docs/pipefusion.md.
"""

from __future__ import annotations

import pytest

from tests.pipefusion.jobs import Spawn, check_image, check_p2p_neighbours

STEPS = 8


def _pf(m: int, w: int) -> dict:
    return {"pipefusion_parallel_degree": 2, "num_pipeline_patch": m, "warmup_steps": w}


# (id, pipeline, options, true CFG, exact?)
CASES = [
    ("pixart_m1", "pixart", _pf(1, 1), False, True),
    ("sd3_m1", "sd3", _pf(1, 1), False, True),
    ("flux_truecfg_m1", "flux", _pf(1, 1), True, True),
    ("sd3_m2_warmup_all", "sd3", _pf(2, STEPS), False, True),
    ("pixart_m2_w1", "pixart", _pf(2, 1), False, False),
    ("pixart_m4_w1", "pixart", _pf(4, 1), False, False),
    ("sd3_m2_w1", "sd3", _pf(2, 1), False, False),
    ("sd3_m4_w1", "sd3", _pf(4, 1), False, False),
    ("flux_truecfg_m2_w1", "flux", _pf(2, 1), True, False),
    ("flux_truecfg_m4_w1", "flux", _pf(4, 1), True, False),
]
IDS = [c[0] for c in CASES]
_results = Spawn(CASES, 2, STEPS)


_single: dict[str, dict] = {}


def result_of(case: str) -> dict:
    """Rank 0's result of ``case`` (from this file's run when it ran, else a run of that case alone)."""
    if _results.results is not None:
        return _results()[0][IDS.index(case)]
    if case not in _single:
        _single[case] = Spawn([CASES[IDS.index(case)]], 2, STEPS)()[0][0]
    return _single[case]


def check_like_alone(case: str, cases: list[tuple], results: list[list[dict]]) -> None:
    """A hybrid's image on every rank: exact, or stale with PipeFusion alone's error (to 1e-6).

    ``cases`` rows: (id, pipeline, options, true CFG, exact?, the 2-rank case with the same
    patches). With SP or a batch split beside it, patch ``i`` covers the same tokens as with
    PipeFusion alone, so the stale-K/V error must be the same as that case's on 2 ranks.
    """
    i = [c[0] for c in cases].index(case)
    _, _, options, _, exact, same_as = cases[i]
    for per_rank in results:
        r = per_rank[i]
        check_image(case, r, exact)
        assert r["options"] == options and r["graphs"] == 1, r["report"]
        if not exact:
            rel = r["err"] / r["scale"]
            ref = result_of(same_as)
            assert abs(rel - ref["err"] / ref["scale"]) < 1e-6, (case, rel, ref["err"] / ref["scale"])


@pytest.mark.parametrize("case", IDS)
def test_image_matches_single_rank(case: str) -> None:
    i = IDS.index(case)
    exact = CASES[i][4]
    for per_rank in _results():
        r = per_rank[i]
        check_image(case, r, exact)
        assert r["graphs"] == 1, r["report"]  # one compile for the whole loop


@pytest.mark.parametrize("case", IDS)
def test_steps_streams_and_warmup(case: str) -> None:
    i = IDS.index(case)
    _, _, options, cfg, _ = CASES[i]
    streams = 2 if cfg else 1
    for per_rank in _results():
        calls = per_rank[i]["calls"]
        w = options["warmup_steps"]
        full = [(s, c, s < w or options["num_pipeline_patch"] == 1) for s in range(STEPS) for c in range(streams)]
        assert calls == full, calls


@pytest.mark.parametrize("case", ["pixart_m2_w1", "flux_truecfg_m4_w1"])
def test_p2p_between_neighbours_only(case: str) -> None:
    i = IDS.index(case)
    m = CASES[i][2]["num_pipeline_patch"]
    for rank, per_rank in enumerate(_results()):
        r = per_rank[i]
        check_p2p_neighbours(r, rank, m)
