"""``memory_budget`` (``xdit_compile/memory.py``): the option, the per-rank estimate, the automatic tp pick.

Single process: the option's parsing and its errors, the tp degrees the automatic plan may take,
and the estimate on a captured tiny PixArt graph (from which the budget of the spawn is chosen).
One spawn of 2 ranks (inner eager) runs, in order:

* auto: PixArt (batch 2) with a budget between TP 2's per-rank total and one rank's parameter
  bytes and every degree unset: the automatic plan takes tp 2 (without a budget it is cfg 2), the
  report says why, the output matches one rank within 1e-4 of its scale, and the estimated
  parameter bytes are within ``PARAM_TOL`` of the bytes this rank really keeps (its parameters'
  storage, whole or the slices ``split_weights`` cut);
* warn: SD3 under ulysses 2 (degrees given) with a budget it does not fit: it runs (exact), and the
  report WARNs with the figures;
* none: PixArt, degrees unset, a budget nothing fits: ``PlanError`` (wrapped by Dynamo) naming the
  budget, the best plan's bytes and the fix;
* plain: PixArt, no budget: the automatic plan is cfg 2, as before, with no memory line.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from xdit_compile import ParallelPlan, PlanError
from xdit_compile.memory import MemoryEstimate, _with_tp, fmt_bytes, parse_bytes, tp_degrees
from xdit_compile.testing.harness import run_spmd

TOL = 1e-4
PARAM_TOL = 0.02  # estimated vs kept parameter bytes, relative (the estimate runs the same choose_tp: exact so far)


# ---------------------------------------------------------------------- single process
def test_budget_option_parses_ints_and_units() -> None:
    assert ParallelPlan.from_options({"memory_budget": 1 << 20}).memory_budget == 1 << 20
    assert ParallelPlan.from_options({"memory_budget": "24GiB"}).memory_budget == 24 * 2**30
    assert ParallelPlan.from_options({"memory_budget": "24 GB"}).memory_budget == 24 * 10**9
    assert ParallelPlan.from_options({"memory_budget": "1.5mib"}).memory_budget == 3 * 2**19
    assert parse_bytes("4096") == 4096 and parse_bytes(None) is None
    assert ParallelPlan.from_options({}).memory_budget is None
    plan = ParallelPlan.from_options({"memory_budget": "1KiB", "ulysses_degree": 2}).resolve(2)
    assert plan.memory_budget == 1024 and plan.describe() == "ulysses=2"


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "", "lots", "10 XB", "0GiB", "-1GiB", ["1GiB"]])
def test_bad_budgets_name_the_option_and_the_fix(bad: Any) -> None:
    with pytest.raises(PlanError, match=r"memory_budget=.*not accepted.*GiB") as e:
        ParallelPlan.from_options({"memory_budget": bad})
    assert "units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB" in str(e.value)


def test_tp_degrees_divide_world_and_heads() -> None:
    assert tp_degrees(4, 4) == [2, 4]
    assert tp_degrees(4, 3) == []
    assert tp_degrees(6, 6) == [2, 3, 6] and tp_degrees(8, None) == [2, 4, 8]
    # tp comes out of the sequence axis's share; the rest is resolved as before (batch first).
    auto = ParallelPlan(memory_budget=1)
    assert _with_tp(auto, 4, 2, 4, 2).describe() == "cfg=2 x tp=2"
    assert _with_tp(auto, 4, 1, 4, 2).describe() == "ulysses=2 x tp=2"
    assert _with_tp(auto, 4, 1, 2, 2).describe() == "ring=2 x tp=2"  # 2 heads: tp 2 leaves 1 per rank for Ulysses
    assert _with_tp(auto, 2, 2, 4, 2).describe() == "tp=2"  # batch 2 on 2 ranks: out of the cfg axis


def test_estimate_text() -> None:
    e = MemoryEstimate("tp=2", 2**20, 400 * 2**10, 800 * 2**10, 200 * 2**10, chosen="tp 2 chosen: x")
    assert str(e) == ("tp 2 chosen: x; fits: parameters 400.00 KiB + activations ~200.00 KiB of 1.00 MiB budget "
                      "(per rank)")
    assert not MemoryEstimate("single rank", 2**20, 2**20, 2**20, 1).fits
    assert fmt_bytes(28 * 2**30) == "28.00 GiB" and fmt_bytes(10) == "10 B"


_graphs: dict[str, tuple[Any, list[Any], int]] = {}


def test_measured_bytes_replace_the_estimate_in_the_verdict() -> None:
    from xdit_compile import memory
    from xdit_compile.report import AxisReport, PlanReport

    report = PlanReport("graph 0", "tp=2", 0, 2, 1)
    est = MemoryEstimate("tp=2", 1000, 1200, 2000, 100)
    memory.attach(report, est)
    assert len(report.warnings) == 1 and "a larger tensor_parallel_degree" in report.warnings[0]
    tp = AxisReport("tp", 2)
    tp.param_bytes = (800, 2000)  # what split_weights measured
    report.axes.append(tp)
    memory.measured(report)
    assert report.warnings == [] and est.fits and str(est) == (
        "fits: parameters 800 B (estimated 1.17 KiB) + activations ~100 B of 1000 B budget (per rank)")
    assert "  memory: fits: parameters 800 B" in str(report)


def _captured(name: str) -> tuple[Any, list[Any], int]:
    """A tiny model's Dynamo graph, its example inputs and the model's parameter and buffer bytes."""
    if name not in _graphs:
        _graphs[name] = _capture(name)
    return _graphs[name]


def _capture(name: str) -> tuple[Any, list[Any], int]:
    import torch

    from examples.tiny_dits import make

    model, kw = make(name, batch=2)
    got: list[Any] = []

    def capture(gm, ex):
        got.append((gm, list(ex)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(**kw)
    tensors = [*model.parameters(), *model.buffers()]
    return got[0][0], got[0][1], sum(p.numel() * p.element_size() for p in tensors)


_budgets: dict[str, int] = {}


def _auto_budget() -> int:
    """A budget between PixArt's TP 2 per-rank total and one rank's parameter bytes (so only tp fits)."""
    if not _budgets:
        from xdit_compile import memory
        from xdit_compile.facts import graph_facts

        gm, ex, model_bytes = _captured("pixart")
        batch, heads = graph_facts(gm)
        whole = memory.estimate(ParallelPlan(cfg=2).resolve(2, batch, heads), gm, ex, batch)
        tp2 = memory.estimate(ParallelPlan(tp=2).resolve(2, batch, heads), gm, ex, batch)
        assert whole.params == whole.params_whole == model_bytes
        assert tp2.total < whole.params, (tp2, whole)  # else no budget lies between them
        _budgets["auto"] = (tp2.total + whole.params) // 2
    return _budgets["auto"]


def test_estimate_per_plan_on_pixart() -> None:
    """Parameters: whole without tp / pp, about half of the blocks' under TP 2 or two stages;
    activations: halved by the axes that split tokens or batch, not by tp."""
    from xdit_compile import memory
    from xdit_compile.facts import graph_facts

    gm, ex, whole = _captured("pixart")
    batch, heads = graph_facts(gm)
    nodes = len(gm.graph.nodes)

    def est(**degrees: int) -> MemoryEstimate:
        plan = ParallelPlan(**degrees)
        return memory.estimate(plan.resolve(plan.world_size, batch, heads), gm, ex, batch)

    one, uly, cfg, tp2, pp2 = est(), est(ulysses=2), est(cfg=2), est(tp=2), est(pp=2)
    assert one.params == uly.params == cfg.params == whole and one.budget is None
    assert uly.activations == cfg.activations == one.activations // 2 and tp2.activations == one.activations
    assert 0.45 * whole < tp2.params < 0.6 * whole, (tp2, whole)
    assert 0.5 * whole < pp2.params < 0.8 * whole, (pp2, whole)
    assert len(gm.graph.nodes) == nodes  # the estimate plans on a copy


# ---------------------------------------------------------------------- one spawn of 2 ranks
def _kept_bytes(model) -> int:
    """Parameter bytes this rank really holds: whole where the storage is live, else its cut slices."""
    from xdit_compile.tensor_parallel import kept_slices

    kept = 0
    for p in [*model.parameters(), *model.buffers()]:
        if p.untyped_storage().nbytes():
            kept += p.numel() * p.element_size()
        else:
            kept += sum(s.numel() * s.element_size() for s in kept_slices(p))
    return kept


def _job(cases: list[tuple[str, str, dict]]) -> list[dict]:
    import torch

    import xdit_compile
    from examples.tiny_dits import make
    from xdit_compile.testing.parity import _first_tensor

    os.environ.setdefault("XDIT_STRICT", "1")
    out = []
    for case, name, options in cases:
        torch._dynamo.reset()
        xdit_compile.clear_reports()
        model, kw = make(name, batch=2)
        with torch.no_grad():
            ref = _first_tensor(model(**kw, return_dict=False))
        row: dict[str, Any] = {"case": case}
        try:
            with torch.no_grad():
                got = _first_tensor(torch.compile(model, backend="xdit", options={**options, "inner": "eager"})(
                    **kw, return_dict=False))
        except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's PlanError (BackendCompilerFailed)
            row["error"] = str(e)
            out.append(row)
            continue
        rep = xdit_compile.reports()
        row.update(err=float((got - ref).abs().max() / ref.abs().max()), plans=[r.plan for r in rep],
                   memory=[r.memory for r in rep], warnings=[w for r in rep for w in r.warnings],
                   kept=_kept_bytes(model), report="\n".join(str(r) for r in rep))
        out.append(row)
    return out


_cache: list[list[dict]] = []


def _results() -> list[dict[str, list[dict]]]:
    if not _cache:
        cases = [("auto", "pixart", {"memory_budget": _auto_budget()}),
                 ("warn", "sd3", {"ulysses_degree": 2, "memory_budget": "100KiB"}),
                 ("none", "pixart", {"memory_budget": "64KiB"}),
                 ("plain", "pixart", {})]
        _cache.extend(run_spmd(_job, 2, cases, timeout=300))
    return [{r["case"]: r for r in per_rank} for per_rank in _cache]


def test_auto_plan_takes_tp_where_whole_weights_do_not_fit() -> None:
    budget = _auto_budget()
    for rank, rows in enumerate(_results()):
        r = rows["auto"]
        assert "error" not in r, r.get("error")
        assert r["plans"] == ["tp=2"], r["report"]
        m = r["memory"][0]
        assert m.chosen.startswith("tp 2 chosen: whole weights") and f"> budget {fmt_bytes(budget)}" in m.chosen, m
        assert "the automatic plan cfg=2 does not fit" in m.chosen, m
        assert m.fits and not r["warnings"], r["report"]
        assert "memory: tp 2 chosen" in r["report"] and "fits: parameters" in r["report"], r["report"]
        assert r["err"] < TOL, f"rank {rank}: rel err {r['err']}\n{r['report']}"
        # The estimate (choose_tp on a copy, before the passes) against what this rank keeps.
        assert m.measured is not None and abs(m.params - r["kept"]) <= PARAM_TOL * r["kept"], (m, r["kept"])
        assert abs(m.measured - r["kept"]) <= PARAM_TOL * r["kept"], (m, r["kept"])
        assert r["kept"] < m.params_whole * 0.6, (m, r["kept"])


def test_plan_that_does_not_fit_runs_with_a_warning() -> None:
    for rank, rows in enumerate(_results()):
        r = rows["warn"]
        assert "error" not in r, r.get("error")
        assert r["plans"] == ["ulysses=2"], r["report"]
        assert r["err"] < TOL, f"rank {rank}: rel err {r['err']}\n{r['report']}"
        assert not r["memory"][0].fits
        warning = next(w for w in r["warnings"] if w.startswith("memory:"))
        assert "does not fit memory_budget 100.00 KiB per rank: parameters" in warning, warning
        assert "tensor_parallel_degree" in warning, warning
        assert "DOES NOT FIT" in r["report"] and "WARNING: memory:" in r["report"], r["report"]


def test_nothing_fits_is_a_plan_error_naming_budget_best_plan_and_fix() -> None:
    for rows in _results():
        e = rows["none"].get("error", "")
        assert "memory_budget 64.00 KiB per rank: no automatic plan on 2 ranks fits" in e, e
        assert "the best, tp=2, needs parameters" in e and "raise memory_budget to at least" in e, e
        assert "tried cfg=2:" in e, e


def test_without_a_budget_the_automatic_plan_is_unchanged() -> None:
    for rows in _results():
        r = rows["plain"]
        assert r["plans"] == ["cfg=2"] and r["memory"] == [None], r["report"]
        assert "memory:" not in r["report"] and r["err"] < TOL
