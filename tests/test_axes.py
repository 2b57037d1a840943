"""The axis registry (``xdit_compile/axes.py``) and the ``DeviceMesh`` the plan builds from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch.distributed as dist

from xdit_compile import axes, strategies
from xdit_compile.axis import Axis
from xdit_compile.errors import PlanError
from xdit_compile.plan import ParallelPlan, device_mesh, process_groups
from xdit_compile.strategies.base import Site
from xdit_compile.testing.harness import run_spmd


def test_every_mesh_dim_is_a_plan_field_with_its_option() -> None:
    fields = {f.name for f in dataclasses.fields(ParallelPlan)}
    for dim in axes.MESH_DIMS:
        assert dim.name in fields, f"mesh dimension {dim.name} has no ParallelPlan field"
        assert getattr(ParallelPlan.from_options({dim.option: 2}), dim.name) == 2
    for spec in axes.AXES:
        assert set(spec.mesh_dims) <= set(axes.mesh_dim_names())


def test_degrees_of_axes_come_from_their_dims() -> None:
    plan = ParallelPlan(dp=2, cfg=2, pp=1, ring=3, ulysses=2)
    for spec in axes.AXES:
        want = 1
        for d in spec.mesh_dims:
            want *= getattr(plan, d) or 1  # a dimension registered later (tp) is unset here
        assert plan.degree(spec.name) == want


def test_register_refuses_what_would_break_the_mesh() -> None:
    with pytest.raises(PlanError, match="unknown mesh dimensions"):
        axes.register_axis(axes.AxisSpec("ep", ("ep",), False, None, True))
    with pytest.raises(PlanError, match="already belong"):
        axes.register_axis(axes.AxisSpec("tokens2", ("ulysses",), False, None, True))
    with pytest.raises(PlanError, match="already registered"):
        axes.register_mesh_dim(axes.MeshDim("ring", "ring_degree", "again"))
    with pytest.raises(PlanError, match="registered axes"):
        axes.axis_spec("heads")


def test_an_axis_names_the_strategies_it_allows() -> None:
    # A token-sharded attention on the batch axis only rings; the reason names the spec.
    site = Site("attn", Axis(axes.BATCH, 2, 0, "1"), 4, 4, q_bytes=1.0, k_bytes=1.0)
    chosen, rejected = strategies.choose(site)
    assert chosen.name == "ring"
    assert any("AxisSpec.strategies" in why for _, why in rejected)


def _mesh_groups(plans: list[dict]) -> list[dict[str, list[list[int]]]]:
    out = []
    for options in plans:
        plan = ParallelPlan(**options)
        mesh = device_mesh(plan)
        groups = process_groups(plan)
        out.append({"dims": list(mesh.mesh_dim_names),
                    **{name: sorted(dist.get_process_group_ranks(g)) for name, g in groups.items()}})
    return out


def test_device_mesh_groups_match_the_plan_layout() -> None:
    plans = [dict(cfg=2, ulysses=2, dp=1, pp=1, ring=1), dict(ring=2, ulysses=2, dp=1, cfg=1, pp=1),
             dict(dp=2, ring=2, cfg=1, pp=1, ulysses=1), dict(ulysses=4, dp=1, cfg=1, pp=1, ring=1)]
    per_rank = run_spmd(_mesh_groups, 4, plans)
    for i, options in enumerate(plans):
        plan = ParallelPlan(**options)
        for rank, results in enumerate(per_rank):
            got = results[i]
            assert got["dims"] == [d for d in axes.mesh_dim_names() if plan.degree(d) > 1]
            for name, ranks in got.items():
                if name == "dims":
                    continue
                want = next(g for g in plan.axis_groups(name) if rank in g)
                assert ranks == sorted(want), (options, rank, name)
                assert [plan.axis_rank(name, r) for r in want] == list(range(plan.degree(name)))
