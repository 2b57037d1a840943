"""The process-wide ``Context`` (``xdit_compile/context.py``): settings seeded by the environment,
reset, the public wrappers over it, and PipeFusion reports that do not keep drivers alive."""

from __future__ import annotations

import gc

import pytest

import xdit_compile
from xdit_compile import context, pipefusion
from xdit_compile.report import PlanReport, publish


@pytest.fixture
def fresh() -> context.Context:
    saved = context.current()
    yield context.reset()
    context._CONTEXT[0] = saved


def test_settings_follow_the_environment_until_set(fresh: context.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDIT_DISABLE_PASSES", "plan:sp, lower")
    monkeypatch.setenv("XDIT_STRICT", "1")
    s = fresh.settings
    assert s.passes_off() == {"plan:sp", "lower"} and s.is_strict() and not s.keeps_graphs()
    s.disabled_passes, s.strict = frozenset(), False
    assert s.passes_off() == frozenset() and not s.is_strict()


def test_reports_live_in_the_context_and_reset_drops_them(fresh: context.Context) -> None:
    publish(PlanReport("graph 0", "ulysses=2", 0, 2, 5))
    assert [r.graph for r in xdit_compile.reports()] == ["graph 0"] and fresh.reports
    epoch = fresh.kv_epoch
    again = context.reset()
    assert xdit_compile.reports() == [] and again.kv_epoch == epoch + 1  # PipeFusion starts a new generation
    publish(PlanReport("graph 1", "ulysses=2", 0, 2, 5))
    xdit_compile.clear_reports()
    assert xdit_compile.reports() == []


def test_pipefusion_configure_and_reports_go_through_the_context(fresh: context.Context) -> None:
    pipefusion.configure(free_unused_parameters=False)
    assert fresh.settings.free_unused_parameters is False
    assert pipefusion.reports() == []


def test_pipefusion_report_holds_only_a_weak_reference_to_its_driver() -> None:
    import weakref

    from xdit_compile.pipefusion.entry import PipeFusionReport

    class Driver:  # stands for PipelineDriver (and its K/V buffers)
        pass

    d = Driver()
    rep = PipeFusionReport(0, 0, 2, 2, 1, "cuts", [1.0], [8], 4, 8, driver_ref=weakref.ref(d))
    assert rep.driver is d
    del d
    gc.collect()
    assert rep.driver is None  # the report kept statistics only


def test_group_cache_is_emptied_when_the_default_group_changes(fresh: context.Context) -> None:
    groups, worlds = fresh.group_cache("world A")
    groups[("key",)] = {"sp": "g"}
    assert fresh.group_cache("world A")[0] == {("key",): {"sp": "g"}}
    assert fresh.group_cache("world B") == ({}, {})
