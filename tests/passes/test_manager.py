"""The pass manager (``passes/manager.py``): order checks, disabling with dependents, timing, errors.

Hand-built pass lists on a traced toy graph (no processes); the backend's and PipeFusion's own
lists are checked for order and for what disabling their first pass skips.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx

from xdit_compile.axis import Axis
from xdit_compile.errors import PassError, PassOrderError, PlanError
from xdit_compile.passes.manager import Pass, check_order, plan_skips, run_passes


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(lambda x: torch.relu(x) + 1)


def _noop(gm: fx.GraphModule, ctx: list[str]) -> bool:
    return False


def _record(name: str):
    def fn(gm: fx.GraphModule, ctx: list[str]) -> bool:
        ctx.append(name)
        return True
    return fn


def test_requirement_not_provided_earlier_names_pass_and_fact() -> None:
    passes = [Pass("lower:sp", _noop, requires=("plan:sp",)), Pass("plan:sp", _noop, provides=("plan:sp",))]
    with pytest.raises(PassOrderError, match=r"'lower:sp' requires 'plan:sp'.*move plan:sp before it"):
        run_passes(_gm(), [], passes)
    with pytest.raises(PassOrderError, match="more than once"):
        check_order([Pass("a", _noop), Pass("a", _noop)])


def test_disabling_a_pass_skips_its_dependents_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    passes = [Pass("plan:sp", _record("plan"), provides=("plan:sp",)),
              Pass("lower:sp", _record("lower"), requires=("plan:sp",), provides=("lowered:sp",)),
              Pass("refresh:sp", _record("refresh"), requires=("lowered:sp",)),
              Pass("strip_marks", _record("strip"))]
    ran: list[str] = []
    with caplog.at_level(logging.WARNING, logger="xdit_compile"):
        run = run_passes(_gm(), ran, passes, disabled={"plan:sp", "no_such_pass"})
    assert ran == ["strip"] and run.ran == ["strip_marks"]
    assert set(run.skipped) == {"plan:sp", "lower:sp", "refresh:sp"}
    text = caplog.text
    assert "pass plan:sp disabled by XDIT_DISABLE_PASSES; skipped too, since they need it: lower:sp, refresh:sp" in text
    assert "lower:sp skipped too: it needs pass plan:sp" in text
    assert "names no pass ['no_such_pass']" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xdit_compile"):  # names another list of the compile runs
        run_passes(_gm(), [], passes[3:], disabled={"pipefusion:patches"}, also_known=[Pass("pipefusion:patches", _noop)])
        run_passes(_gm(), [], passes[3:], disabled={"plan:sp"}, also_known=None)
    assert "names no pass" not in caplog.text
    # A family name disables each of its passes.
    assert set(plan_skips(passes, {"lower"})) == {"lower:sp", "refresh:sp"}


def test_timing_changes_and_errors_name_the_pass() -> None:
    seconds: dict[str, float] = {}
    run = run_passes(_gm(), [], [Pass("a", _record("a")), Pass("b", _noop)], seconds=seconds)
    assert set(seconds) == {"a", "b"} and run.changed == {"a": True, "b": False}

    def boom(gm: fx.GraphModule, ctx: object) -> bool:
        raise KeyError("prop")

    def refuse(gm: fx.GraphModule, ctx: object) -> bool:
        raise PlanError("plan refused: use fewer ranks")

    with pytest.raises(PassError, match=r"xdit pass 'b' failed after passes \['a'\]: KeyError"):
        run_passes(_gm(), [], [Pass("a", _noop), Pass("b", boom)], seconds=seconds)
    assert "a" in seconds  # the times of the passes before a failure stay
    with pytest.raises(PlanError, match="use fewer ranks"):  # our own errors pass through unwrapped
        run_passes(_gm(), [], [Pass("a", refuse)])


def test_backend_and_pipefusion_pass_lists_are_ordered() -> None:
    from xdit_compile.backend import _axis_passes, _front_passes
    from xdit_compile.pipefusion.entry import STAGE_PASSES

    axes = [Axis("batch", 2, 0, "g0"), Axis("sp", 2, 0, "g1", ulysses=2)]
    passes = [*_front_passes(settle=True), *[p for a in axes for p in _axis_passes(a)]]
    check_order(passes)
    check_order(STAGE_PASSES)
    assert set(plan_skips(passes, {"plan:sp"})) == {"plan:sp", "lower:sp", "refresh:sp"}
    assert set(plan_skips(STAGE_PASSES, {"pipefusion:stages"})) == {p.name for p in STAGE_PASSES}
    assert set(plan_skips(STAGE_PASSES, {"pipefusion:patches"})) == {"pipefusion:patches"}


def test_plan_sp_disabled_on_the_backend_list_is_no_key_error() -> None:
    """The sp axis's plan disabled: lower:sp and refresh:sp skip instead of reading a missing plan."""
    from xdit_compile.backend import State, _axis_passes, run_passes as backend_run
    from xdit_compile.plan import ParallelPlan
    from xdit_compile.report import PlanReport

    from xdit_compile import context

    saved = context.current()
    context.reset(context.Settings(disabled_passes=frozenset({"plan:sp"})))
    try:
        state = State(ParallelPlan(), [], 0, [], PlanReport("g", "p", 0, 2, 3))
        run = backend_run(_gm(), state, _axis_passes(Axis("sp", 2, 0, "g1", ulysses=2)))
    finally:
        context._CONTEXT[0] = saved
    assert run.ran == [] and set(run.skipped) == {"plan:sp", "lower:sp", "refresh:sp"}
    with pytest.raises(PassError, match="pass plan:sp must run before lower:sp"):
        state.plans.get("sp")
