"""ParallelPlan: options, validation, the automatic plan, ranks and groups."""

from __future__ import annotations

import pytest

from xdit_compile import ParallelPlan, PlanError


def test_options_use_xdit_flag_names() -> None:
    plan = ParallelPlan.from_options({"ulysses_degree": 2, "ring_degree": 2, "use_cfg_parallel": True, "inner": "eager"})
    assert (plan.ulysses, plan.ring, plan.cfg, plan.inner) == (2, 2, 2, "eager")
    typed = ParallelPlan.from_options({"plan": ParallelPlan(ulysses=4)})
    assert typed.ulysses == 4


def test_unknown_option_is_named() -> None:
    with pytest.raises(PlanError, match="ulyses_degree"):
        ParallelPlan.from_options({"ulyses_degree": 2})


def test_degrees_must_multiply_to_world_size() -> None:
    with pytest.raises(PlanError, match=r"ulysses=2 = 2 do not multiply to the world size 4"):
        ParallelPlan(ulysses=2).resolve(4)


def test_bad_degrees_rejected() -> None:
    with pytest.raises(PlanError):
        ParallelPlan(cfg=3)
    with pytest.raises(PlanError):
        ParallelPlan(ulysses=0)
    with pytest.raises(PlanError):
        ParallelPlan(inner="tvm")


def test_auto_plan_splits_batch_then_heads_then_ring() -> None:
    assert ParallelPlan().resolve(2, batch=2, heads=4).describe() == "cfg=2"
    assert ParallelPlan().resolve(8, batch=2, heads=4).describe() == "cfg=2 x ulysses=4"
    assert ParallelPlan().resolve(4, batch=1, heads=2).describe() == "ring=2 x ulysses=2"
    assert ParallelPlan().resolve(4, batch=1, heads=3).describe() == "ring=4"


def test_axis_order_and_groups() -> None:
    plan = ParallelPlan(cfg=2, ring=2, ulysses=2).resolve(8)
    assert plan.coords(5) == {"dp": 0, "cfg": 1, "pp": 0, "ring": 0, "ulysses": 1}
    assert plan.axis_groups("ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.axis_groups("sp")[0] == [0, 1, 2, 3]
    assert plan.axis_groups("batch")[0] == [0, 4]
    assert [plan.axis_rank("sp", r) for r in range(4)] == [0, 1, 2, 3]
