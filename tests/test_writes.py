"""Writes into views of sharded tensors stay sharded, and copies are taken after the last write.

Single process (simulated ranks, ``testing.sim_ranks``): small functions captured by Dynamo,
planned and lowered for each rank of a 2-rank sequence axis, run on threads with real
collectives, compared with eager. They pin down where a redistribution of a value written in
place goes (after the last write before its reader) and which plans stay refused (a view of a
copy that is written afterwards).

Multi-process (one spawn per world size): the DiTs of ``tests/adversarial/write_models.py``
(RoPE written with ``copy_`` into views of q/k, and with in-place ops on ``narrow`` views)
under Ulysses 2 and Ring 2 on 2 ranks and USP 2x2 on 4 ranks: exact, and splitting the work.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_compile.axis import Axis
from xdit_compile.graph import op_name, written_inputs
from xdit_compile.passes.choose_seeds import choose_seeds
from xdit_compile.passes.lower import lower
from xdit_compile.passes.propagate import WholeGraphFallback, propagate
from xdit_compile.placements import shard
from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_many
from xdit_compile.testing.sim_ranks import SimWorld

FACTORY = "tests.adversarial.write_models:make"
MODELS = ["hdit_copy", "narrow_inplace"]
TOL = 1e-4
MAX_FLOPS = {2: 0.55, 4: 0.30}  # per-rank FLOPs as a fraction of one rank's


# ---------------------------------------------------------------- single process
def _attn(h: torch.Tensor) -> torch.Tensor:
    q = h.view(h.shape[0], h.shape[1], 2, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q * 0.5, q).transpose(1, 2).flatten(2)


def read_between_writes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = _attn(x) * 1.0
    a = h.flip((1, 2))  # gathers h before the writes
    h.mul_(2.0)
    b = h.flip((1, 2))  # a second copy, after mul_
    h[:, :, 0] = 3.0
    return a + b, h  # the output copy comes after the setitem


def view_of_copy_then_write(x: torch.Tensor) -> torch.Tensor:
    h = _attn(x) * 1.0
    d = h.diagonal(0, 1, 2)  # a view of a gathered copy ...
    h.add_(1.0)  # ... that eager sees this write through
    return d * 2.0


def write_then_view_of_copy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = _attn(x) * 1.0
    h.add_(1.0)
    d = h.diagonal(0, 1, 2)  # nothing writes h afterwards: the copy may be viewed
    return d * 2.0, h


def copy_into_replicated_table(x: torch.Tensor) -> torch.Tensor:
    table = torch.zeros(x.shape)
    table[..., :4].copy_(x[..., :4] * 2)  # the source is gathered; every rank writes the whole table
    return _attn(x + table)


def rope_copy_into_sharded_view(x: torch.Tensor) -> torch.Tensor:
    q = x * 1.0
    theta = torch.linspace(0.0, 3.0, x.shape[1])[:, None]
    x1, x2 = q[..., :2], q[..., 2:4]
    y1 = x1 * theta.cos() - x2 * theta.sin()
    y2 = x2 * theta.cos() + x1 * theta.sin()
    x1.copy_(y1)  # written where each rank holds its tokens
    torch.Tensor.copy_(x2, y2)
    q[..., 4:].fill_(0.5)
    return _attn(q)


def out_into_empty(x: torch.Tensor) -> torch.Tensor:
    c = torch.empty(x.shape)
    torch.add(_attn(x), 1.0, out=c)  # the result is gathered into the whole buffer
    return c.flip((1, 2))


def out_into_fresh_buffer(x: torch.Tensor) -> torch.Tensor:
    c = torch.empty(x.shape)
    torch.add(x, 1.0, out=c)  # c's first use: each rank makes only its shard of it
    return _attn(c)


def out_into_read_buffer(x: torch.Tensor) -> torch.Tensor:
    c = torch.ones(x.shape)
    s = c[:, :1] * 3.0  # read before the write: c stays whole
    torch.mul(x, 2.0, out=c)
    return _attn(c) + s


def _sim(world: SimWorld, fn: Callable, *args: torch.Tensor) -> tuple[dict[str, str], list[str], list[Any]]:
    """(seeds, replicated reasons, per-rank outputs) of ``fn`` planned on a simulated sp axis."""
    graphs: list[tuple[fx.GraphModule, list]] = []

    def capture(gm: fx.GraphModule, ex: list) -> Callable:
        graphs.append((gm, list(ex)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*[a.clone() for a in args])
    (gm, ex), = graphs
    programs, seeds, why = [], {}, []
    for r in range(world.n):
        g = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        prop = choose_seeds(g, world.n, False, args[0].shape[0])
        seeds = {n.name: str(p) for n, p in prop.seeds.items()}
        why = [w for _, w in prop.fallbacks]
        lower(g, prop, Axis("sp", world.n, r, world.group, ulysses=world.n))
        programs.append(g)
    outs = world.run([lambda g=g: g(*[e.clone() for e in ex]) for g in programs])
    return seeds, why, outs


SIM_CASES = {
    # case: whether the input is sharded
    "read_between_writes": True,
    "view_of_copy_then_write": False,
    "write_then_view_of_copy": True,
    "copy_into_replicated_table": True,
    "rope_copy_into_sharded_view": True,
    "out_into_empty": True,
    "out_into_fresh_buffer": True,
    "out_into_read_buffer": True,  # c stays whole; the seed search splits it after the write (activation seed)
}


@pytest.fixture(scope="module")
def sim_results() -> dict[str, tuple[dict, list, list, Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, generator=g)
    out = {}
    with SimWorld(2) as world:
        for name in SIM_CASES:
            fn = globals()[name]
            seeds, why, outs = _sim(world, fn, x)
            out[name] = (seeds, why, outs, fn(x.clone()))
    return out


@pytest.mark.parametrize("name", list(SIM_CASES))
def test_writes_on_simulated_ranks(name: str, sim_results: dict) -> None:
    seeds, why, outs, ref = sim_results[name]
    for r, out in enumerate(outs):
        assert not isinstance(out, BaseException), f"{name} rank {r} raised {out!r}"
        for o, e in zip(out if isinstance(out, (tuple, list)) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert (o - e).abs().max() <= 1e-5 * max(1.0, float(e.abs().max())), f"{name} rank {r}: wrong"
    assert bool(seeds) == SIM_CASES[name], f"{name}: seeds {seeds}, replicated because {why}"
    if name == "view_of_copy_then_write":
        assert any("would view a redistributed copy" in w and "add_" in w for w in why), why


def test_copy_after_last_write_is_placed_after_it() -> None:
    """The lowered program gathers h three times: before mul_, after mul_, after the setitem."""
    graphs: list[fx.GraphModule] = []
    torch._dynamo.reset()
    torch.compile(read_between_writes, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(torch.randn(2, 8, 8))
    gm = graphs[0]
    prop = choose_seeds(gm, 2, False, 2)
    with SimWorld(2) as world:
        lower(gm, prop, Axis("sp", 2, 0, world.group, ulysses=2))
    nodes = list(gm.graph.nodes)
    gathers = [i for i, n in enumerate(nodes) if op_name(n) == "xdit_gather"]
    writes = [i for i, n in enumerate(nodes) if written_inputs(n)]
    assert len(gathers) == 3, gm.code
    assert gathers[0] < writes[0] < gathers[1] < writes[1] < gathers[2], gm.code


# ---------------------------------------------------------------- multi process
def plans_job(plans: dict[str, dict]) -> list[list[ParityResult]]:
    """Every write model under every plan, in one process per rank."""
    return [parity_many(FACTORY, MODELS, {"inner": "eager", **options}) for options in plans.values()]


PLANS = {2: {"ulysses2": {"ulysses_degree": 2}, "ring2": {"ring_degree": 2}},
         4: {"usp2x2": {"ulysses_degree": 2, "ring_degree": 2}}}
_cache: dict[int, list] = {}


def _world(size: int) -> list[list[list[ParityResult]]]:
    if size not in _cache:
        _cache[size] = run_spmd(plans_job, size, PLANS[size], timeout=900)
    return _cache[size]


CASES = [(size, plan, model) for size, plans in PLANS.items() for plan in plans for model in MODELS]


@pytest.mark.parametrize("size,plan,model", CASES, ids=[f"{p}-{m}" for _, p, m in CASES])
def test_write_model_is_exact_and_split(size: int, plan: str, model: str) -> None:
    for per_rank in _world(size):
        r = per_rank[list(PLANS[size]).index(plan)][MODELS.index(model)]
        assert r.fallback is None, f"{model}/{plan} rank {r.rank} fell back: {r.fallback}\n{r.report}"
        assert r.rel_err < TOL, f"{model}/{plan} rank {r.rank}: err {r.max_abs_err} (scale {r.scale})\n{r.report}"
        assert "sharded inputs: L[" in r.report, r.report
        assert r.flops <= MAX_FLOPS[size] * r.ref_flops, (
            f"{model}/{plan} rank {r.rank}: {r.flops} FLOPs vs {r.ref_flops} on one rank "
            f"({r.flops / r.ref_flops:.3f})\n{r.report}")


def copy_into_view_across_shards(x: torch.Tensor) -> torch.Tensor:
    q = x * 1.0
    q[:, 1:3].copy_(x[:, 1:3] * 2.0)  # tokens 1..2: not where a token shard of 8 on 2 ranks ends
    return _attn(q)


def test_write_into_a_view_across_shards_is_refused() -> None:
    """A view cutting the sharded dim off shard boundaries is a gathered copy: writing it would miss q."""
    graphs: list[fx.GraphModule] = []
    torch._dynamo.reset()
    torch.compile(copy_into_view_across_shards, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(
        torch.randn(2, 8, 8))
    gm = graphs[0]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with pytest.raises(WholeGraphFallback, match="would view a redistributed copy .* of q, whose storage copy_"):
        propagate(gm, 2, {x: shard(1, 8)})
    propagate(gm, 2, {x: shard(2, 8)})  # the view keeps the hidden dim whole: a local write
