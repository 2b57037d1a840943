"""ParallelPlan: options, validation, the automatic plan, ranks and groups."""

from __future__ import annotations

import ast

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
    with pytest.raises(PlanError, match=r"ulysses=2 x tp=1 = 2 do not multiply to the world size 4"):
        ParallelPlan(ulysses=2).resolve(4)


def test_bad_degrees_rejected() -> None:
    with pytest.raises(PlanError):
        ParallelPlan(cfg=0)
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
    assert plan.coords(5) == {"dp": 0, "cfg": 1, "pp": 0, "ring": 0, "ulysses": 1, "tp": 0}
    assert plan.axis_groups("ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.axis_groups("sp")[0] == [0, 1, 2, 3]
    assert plan.axis_groups("batch")[0] == [0, 4]
    assert [plan.axis_rank("sp", r) for r in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("options,named,accepted", [
    ({"use_cfg_parallel": "false"}, "use_cfg_parallel='false' (str)", "True (CFG parallel, degree 2) or False"),
    ({"use_cfg_parallel": 1}, "use_cfg_parallel=1 (int)", "True"),
    ({"ulysses_degree": True}, "ulysses_degree=True (bool)", "a positive int"),
    ({"ring_degree": 2.0}, "ring_degree=2.0 (float)", "a positive int"),
    ({"warmup_steps": "1"}, "warmup_steps='1' (str)", "an int >= 0"),
    ({"warmup_steps": 1.5}, "warmup_steps=1.5 (float)", "an int >= 0"),
    ({"warmup_steps": -1}, "warmup_steps=-1 (int)", "an int >= 0"),
    ({"num_pipeline_patch": "4"}, "num_pipeline_patch='4' (str)", "a positive int, or None"),
    ({"num_pipeline_patch": 2.0}, "num_pipeline_patch=2.0 (float)", "a positive int, or None"),
    ({"num_pipeline_patch": 0}, "num_pipeline_patch=0 (int)", "a positive int, or None"),
    ({"timeout": "20"}, "timeout='20' (str)", "a positive number of seconds"),
    ({"timeout": 0}, "timeout=0 (int)", "a positive number of seconds"),
    ({"timeout": True}, "timeout=True (bool)", "a positive number of seconds"),
    ({"check_inputs": "no"}, "check_inputs='no' (str)", "True or False"),
    ({"inner": 3}, "inner=3", "'inductor', 'eager'"),
])
def test_option_types_are_checked(options: dict, named: str, accepted: str) -> None:
    with pytest.raises(PlanError) as info:
        ParallelPlan.from_options(options)
    assert named in str(info.value) and accepted in str(info.value), str(info.value)


def test_options_must_be_a_mapping_of_names() -> None:
    with pytest.raises(PlanError, match=r"options must be a dict .* got list \[\('ulysses_degree', 2\)\]"):
        ParallelPlan.from_options([("ulysses_degree", 2)])  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="option names must be strings"):
        ParallelPlan.from_options({2: "ulysses_degree"})  # type: ignore[dict-item]


def test_timeout_and_check_inputs_options() -> None:
    plan = ParallelPlan.from_options({"timeout": 20, "check_inputs": False})
    assert plan.timeout == 20 and plan.check_inputs is False
    assert plan.timeout_delta.total_seconds() == 20
    assert ParallelPlan().timeout_delta is None and ParallelPlan().check_inputs is True


@pytest.mark.parametrize("degrees,world", [
    ({"ulysses": 4}, 2), ({"ulysses": 3}, 4), ({"ulysses": 2}, 4), ({"cfg": 2, "ulysses": 2}, 2),
    ({"ring": 3, "ulysses": 2}, 4), ({"cfg": 2, "ulysses": 4}, 4), ({"pp": 2, "ring": 2}, 8),
])
def test_mismatch_hint_suggests_degrees_that_fit(degrees: dict, world: int) -> None:
    """Every setting the hint suggests makes a plan of exactly the world size."""
    with pytest.raises(PlanError) as info:
        ParallelPlan(**degrees).resolve(world)
    hint = str(info.value).split("(e.g. ")[1].split(")")[0]
    for suggestion in hint.split(" or "):
        option, _, value = suggestion.partition("=")
        fixed = ParallelPlan.from_options({**_as_options(degrees), option: ast.literal_eval(value)})
        assert fixed.resolve(world).world_size == world, (suggestion, str(info.value))


def _as_options(degrees: dict) -> dict:
    names = {"dp": "data_parallel_degree", "ring": "ring_degree", "ulysses": "ulysses_degree",
             "pp": "pipefusion_parallel_degree"}
    out = {names[k]: v for k, v in degrees.items() if k != "cfg"}
    if "cfg" in degrees:
        out["use_cfg_parallel"] = degrees["cfg"] == 2
    return out


def test_check_plan_validates_before_compiling() -> None:
    from xdit_compile import check_plan

    assert check_plan({"ulysses_degree": 2, "ring_degree": 2}, world_size=4).describe() == "ring=2 x ulysses=2"
    assert check_plan({}, world_size=4).ulysses is None  # an automatic plan is decided from the graph
    with pytest.raises(PlanError, match="do not multiply to the world size 2"):
        check_plan({"ulysses_degree": 4}, world_size=2)
    with pytest.raises(PlanError, match="use_cfg_parallel='yes'"):
        check_plan({"use_cfg_parallel": "yes"})


def test_plan_error_from_compilation_can_be_caught() -> None:
    """Dynamo wraps a backend's error in BackendCompilerFailed; unwrap_errors() re-raises ours."""
    import torch
    from torch._dynamo.exc import BackendCompilerFailed

    import xdit_compile

    fn = torch.compile(lambda x: x * 2, backend="xdit", options={"use_cfg_parallel": "false"})
    with pytest.raises(BackendCompilerFailed) as wrapped:
        fn(torch.ones(2))
    assert isinstance(xdit_compile.unwrap(wrapped.value), PlanError)
    torch._dynamo.reset()
    with pytest.raises(PlanError, match="use_cfg_parallel='false'"):
        with xdit_compile.unwrap_errors():
            fn(torch.ones(2))
    torch._dynamo.reset()
