"""Stage split, policy, patch programs and step state on captured graphs (one process, no ranks).

Exact checks: the stages of a split graph, chained, compute exactly what the graph computes.
"""

from __future__ import annotations

import pytest
import torch

from examples.tiny_dits import make
from xdit_compile import ParallelPlan, PlanError
from xdit_compile.graph import op_name
from xdit_compile.pipefusion import kv
from xdit_compile.pipefusion.cuts import find_cuts, token_inputs
from xdit_compile.pipefusion.policy import balance
from xdit_compile.pipefusion.programs import PATCH_GROUP, patch_program, stamp_layers
from xdit_compile.pipefusion.split import mark_stages, split_stages

_CAPTURED: dict[str, tuple] = {}


def captured(name: str) -> tuple:
    """(graph, example inputs, eager output) of a tiny model, captured once per test session."""
    if name not in _CAPTURED:
        model, inputs = make(name)
        graphs = []

        def grab(gm, example_inputs):  # type: ignore[no-untyped-def]
            graphs.append((gm, example_inputs))
            return gm.forward

        with torch.no_grad():
            out = torch.compile(model, backend=grab)(**inputs, return_dict=False)[0]
        assert len(graphs) == 1
        _CAPTURED[name] = (*graphs[0], out)
    return _CAPTURED[name]


def _split(name: str, stages: int):  # type: ignore[no-untyped-def]
    gm, ex, out = captured(name)
    cuts = find_cuts(gm)
    chosen = balance(cuts.unit_costs, stages)
    mark_stages(gm, cuts.nodes, cuts.positions, chosen)
    return gm, ex, out, cuts, split_stages(gm, stages)


@pytest.mark.parametrize("name,layers,min_cuts", [("pixart", 4, 2), ("sd3", 2, 1), ("flux", 2, 1), ("dit", 2, 1)])
def test_cuts_between_blocks(name: str, layers: int, min_cuts: int) -> None:
    gm, _, _ = captured(name)
    cuts = find_cuts(gm)
    assert cuts.attention_layers == layers
    assert len(cuts.positions) >= min_cuts, cuts.describe()
    assert len(cuts.unit_costs) == len(cuts.positions) + 1 and all(c > 0 for c in cuts.unit_costs)
    lo, hi = cuts.blocks
    assert 0 < lo < hi < len(cuts.nodes) - 1, cuts.blocks


@pytest.mark.parametrize("name,stages", [("pixart", 2), ("pixart", 3), ("sd3", 2), ("flux", 2), ("dit", 2)])
def test_chained_stages_equal_the_graph(name: str, stages: int) -> None:
    gm, ex, ref, cuts, parts = _split(name, stages)
    vals: list = []
    with torch.no_grad():
        for st in parts:
            out = st.gm(*[ex[i] for i in st.inputs], *vals)
            vals = list(out)
    assert torch.equal(vals[0], ref)
    # Only tensors cross, and each boundary is what the next stage receives.
    for a, b in zip(parts, parts[1:]):
        assert a.send == b.recv and a.send_names == b.recv_names


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_first_stage_embeds_last_projects(name: str) -> None:
    gm, _, _, _, parts = _split(name, 2)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    token = phs.index(token_inputs(gm)[0])
    assert token in parts[0].inputs and token not in parts[1].inputs
    # Each stage reads a share of the weights; the blocks' weights are not all on one side.
    weights = [i for i, n in enumerate(phs) if "parameters" in n.name]
    only0 = [i for i in weights if i in parts[0].inputs and i not in parts[1].inputs]
    only1 = [i for i in weights if i in parts[1].inputs and i not in parts[0].inputs]
    assert only0 and only1


def test_balance_policy() -> None:
    assert balance([1, 1, 1, 1], 2) == [1]
    assert balance([3, 1, 1, 1], 2) == [0]
    assert balance([1, 1, 1, 1, 1, 1], 3) == [1, 3]
    assert balance([5.0], 1) == []


def test_too_many_stages_names_the_fix() -> None:
    gm, _, _ = captured("sd3")
    with pytest.raises(PlanError, match=r"pipefusion_parallel_degree <= 2"):
        balance(find_cuts(gm).unit_costs, 3)


def test_too_many_patches_names_the_fix() -> None:
    gm, ex, _ = captured("pixart")
    with pytest.raises(PlanError, match=r"num_pipeline_patch <= 16"):
        patch_program(gm, 1000, 0, 2, ex)


def test_degrees_must_multiply() -> None:
    with pytest.raises(PlanError, match="world size"):
        ParallelPlan(pp=3).resolve(2)


def test_patch_program_has_stale_attention_and_no_collective() -> None:
    gm, ex, _ = captured("pixart")
    stamp_layers(gm)
    g, assembly, layers, seeds = patch_program(gm, 2, 1, 2, ex)
    stale = [n for n in g.graph.nodes if op_name(n) == "stale_kv_attention"]
    assert len(stale) == len(layers) == 2  # self-attention; cross-attention to text stays local
    assert not any(PATCH_GROUP in map(str, n.args) for n in g.graph.nodes)
    assert [x is not None for x in assembly.gathers] == [True]
    assert seeds and "hidden_states" in seeds[0]


def test_step_state_steps_streams_generations() -> None:
    st = kv.StepState(warmup_steps=1)
    seq = [st.on_call(k) for k in [(1.0,), (1.0,), (0.5,), (0.5,), (0.25,)]]
    for stream, full in [(0, True), (1, True)]:
        st.done(stream, full)
    assert [s[:2] for s in seq] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert st.on_call((1.0,))[:2] == (0, 0) and st.generations == 2  # schedule restarted
    assert st.on_call((0.5,))[:2] == (1, 0)
    kv.reset()
    assert st.on_call((0.25,)) == (0, 0, True) and st.generations == 3  # explicit reset


def test_pipefusion_with_ring_is_accepted() -> None:
    from xdit_compile.pipefusion.entry import _check_plan

    gm, _, _ = captured("pixart")
    _check_plan(ParallelPlan(pp=2, ring=2), gm)  # ring runs inside each stage (tests/pipefusion/test_ring.py)


def test_too_many_patches_with_ulysses_names_the_fix() -> None:
    from xdit_compile.axis import Axis

    gm, ex, _ = captured("pixart")
    with pytest.raises(PlanError, match=r"num_pipeline_patch=16 x ulysses_degree=2 .* use num_pipeline_patch <= 8"):
        patch_program(gm, 16, 0, 2, ex, Axis("sp", 2, 0, "g", ulysses=2))


def test_sp_annotations_are_reported_as_ignored() -> None:
    """PipeFusion derives its own patch and sp split: a user's sp annotation is dropped, and said so."""
    import xdit_compile
    from xdit_compile.pipefusion.entry import _check_plan

    graphs = []

    def grab(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    def fn(x: torch.Tensor) -> torch.Tensor:
        return xdit_compile.shard(x, 1) * 2

    torch.compile(fn, backend=grab)(torch.randn(2, 4))
    notes = _check_plan(ParallelPlan(pp=2), graphs[0])
    assert len(notes) == 1 and "annotations ignored" in notes[0] and "(sp)" in notes[0], notes
    assert not any(op_name(n) == "mark" for n in graphs[0].graph.nodes)
