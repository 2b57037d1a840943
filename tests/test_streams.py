"""Empty tensors, two attending streams, misaligned prefixes and ``diag_embed`` on 2 ranks.

The models (``tests/adversarial/stream_models.py``) run under Ulysses 2, Ring 2 and CFG 2 in ONE
``run_spmd`` call. Each must match single-rank eager (exact: relative error < 1e-4), run no graph
wholly replicated, run no op replicated (the report lists none), and split the work: per-rank FLOPs
at most ``MAX_FLOPS`` of one rank's. On the sequence axis every self/joint attention of every model
(both streams' own attentions included) is lowered to Ulysses or Ring, never run replicated; the
misaligned prefix is sharded as ``S(1:7+64)`` (its slices are local).
"""

from __future__ import annotations

from typing import Any

import pytest

from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_job

FACTORY = "tests.adversarial.stream_models:make"
MODELS = ["empty_cat", "empty_split", "two_streams", "av_streams", "prefix", "cut_joint", "diag_embed"]
PLANS = {
    "ulysses2": {"ulysses_degree": 2, "inner": "eager"},
    "ring2": {"ring_degree": 2, "inner": "eager"},
    "cfg2": {"use_cfg_parallel": True, "inner": "eager"},
}
LOWERED = {"ulysses2": "-> ulysses", "ring2": "-> ring"}
# Self-attention calls per model (cross-attention to replicated text stays local).
SELF_ATTENTION = {"empty_cat": 1, "empty_split": 1, "two_streams": 3, "av_streams": 3, "prefix": 2, "cut_joint": 2,
                  "diag_embed": 1}
TOL = 1e-4
MAX_FLOPS = 0.6

_cache: list[list[Any]] = []


def streams_job(plans: dict[str, dict[str, Any]], names: list[str]) -> list[Any]:
    """Every (plan, model) pair on this rank; a failure is returned as its text, not raised."""
    import traceback

    out: list[Any] = []
    for options in plans.values():
        for name in names:
            try:
                out.append(parity_job(FACTORY, name, options))
            except Exception:  # noqa: BLE001 - one model's failure must not hide the others'
                out.append(traceback.format_exc(limit=4)[-3000:])
    return out


def _results() -> list[list[Any]]:
    if not _cache:
        _cache.extend(run_spmd(streams_job, 2, PLANS, MODELS, timeout=900))
    return _cache


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", MODELS)
def test_stream_model_exact_and_parallel(plan: str, model: str) -> None:
    index = list(PLANS).index(plan) * len(MODELS) + MODELS.index(model)
    for results in _results():
        r = results[index]
        assert isinstance(r, ParityResult), f"{model} under {plan} raised:\n{r}"
        assert r.fallback is None, f"{model} {plan} rank {r.rank} fell back: {r.fallback}\n{r.report}"
        assert "WHOLE GRAPH" not in r.report, r.report
        # Empty pieces, cuts and diag_embed have rules now: nothing runs replicated.
        assert "    replicated " not in r.report and "-> replicated" not in r.report, r.report
        assert r.rel_err < TOL, f"{model} {plan} rank {r.rank}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"
        assert r.flops <= MAX_FLOPS * r.ref_flops, (
            f"{model} {plan} rank {r.rank}: {r.flops} FLOPs vs {r.ref_flops} on one rank\n{r.report}")
        if model == "prefix" and plan in LOWERED:
            assert "S(1:7+64)" in r.report, r.report
        if plan in LOWERED:
            assert r.report.count(LOWERED[plan]) >= SELF_ATTENTION[model], (
                f"{model} {plan}: {SELF_ATTENTION[model]} attentions should be lowered ({LOWERED[plan]})\n{r.report}")


# ------------------------------------------------------------------ the seed search, in one process

def _plan(name: str) -> tuple[Any, float]:
    """(propagation, search seconds) of model ``name``'s graph on a fake 2-rank sequence axis."""
    import time

    import torch

    from tests.adversarial.stream_models import make
    from xdit_compile.backend import graph_facts
    from xdit_compile.passes.canonical_attention import canonical_attention
    from xdit_compile.passes.choose_seeds import choose_seeds
    from xdit_compile.passes.recognise import recognise

    graphs = []

    def backend(gm: Any, example_inputs: list) -> Any:
        graphs.append(gm)
        return gm.forward

    model, kwargs = make(name)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kwargs, return_dict=False)
    gm = graphs[0]
    canonical_attention(gm)
    recognise(gm)
    start = time.perf_counter()
    prop = choose_seeds(gm, 2, False, graph_facts(gm)[0])
    return prop, time.perf_counter() - start


@pytest.mark.parametrize("model", ["two_streams", "av_streams"])
def test_search_shards_both_streams(model: str) -> None:
    from xdit_compile.graph import op_name

    prop, seconds = _plan(model)
    assert sorted(p.dim for p in prop.seeds.values()) == [1, 1], prop.seeds  # image and text tokens
    sdpa = [n for n in prop.decisions if op_name(n) == "scaled_dot_product_attention"]
    assert [prop.decisions[n].attention for n in sdpa] == ["sequence"] * 3
    assert seconds < 2.0


def test_search_cuts_the_seed_at_the_prefix() -> None:
    from xdit_compile.graph import op_name
    from xdit_compile.placements import Shard

    prop, _ = _plan("prefix")
    assert list(prop.seeds.values()) == [Shard(1, (7, 64), 1)]
    slices = [d for n, d in prop.decisions.items() if op_name(n) == "getitem"]
    assert slices and all(not d.needs for d in slices)  # every text/image slice is local
