"""Each op family under a forced token shard: gathered result == full computation.

Runs the cases of ``cases.py`` compiled with backend "xdit" on real gloo ranks (Ulysses 2 on
2 ranks, USP 2x2 on 4) and checks exactness plus the replicated fallbacks the report names.
"""

from __future__ import annotations

import pytest

from tests.rules.cases import CASES, run_cases
from xdit_compile.testing.harness import run_spmd

_cache: dict[str, list] = {}
WORLDS = {"ulysses2": (2, {"ulysses_degree": 2}), "usp2x2": (4, {"ulysses_degree": 2, "ring_degree": 2})}


def _results(world: str) -> list:
    if world not in _cache:
        size, options = WORLDS[world]
        _cache[world] = run_spmd(run_cases, size, options, timeout=600)
    return _cache[world]


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(world: str, case) -> None:
    i = [c.name for c in CASES].index(case.name)
    for rank, results in enumerate(_results(world)):
        name, err, scale, report, fallback = results[i]
        assert err <= 1e-4 * max(scale, 1.0), f"{name} rank {rank}: err {err}\n{report}"
        if case.whole_graph:
            assert fallback is not None and "in-place" in fallback, report
            continue
        assert fallback is None, f"{name}: whole graph replicated: {fallback}\n{report}"
        if case.expect is None:
            assert "replicated " not in report, f"{name}: unexpected replicated node\n{report}"
        else:
            assert case.expect in report, f"{name}: expected fallback {case.expect!r}\n{report}"
