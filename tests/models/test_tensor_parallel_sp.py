"""Megatron sequence parallel on the tp axis (``tp_sequence_shard=True``, ``xdit_compile/tp_sequence.py``).

One spawn of 2 ranks (inner eager) runs every model under TP 2 with ``tp_sequence_shard``
(partial sums reduce-scattered into token shards, gathered before the next column-parallel
linear) and checks on every rank:

* parity: the output matches single-rank eager within 1e-4 of its scale;
* traffic: bytes received per call (what the collectives deliver to this rank: an all-reduce of
  B bytes 2B(n-1)/n, a reduce-scatter B(n-1)/n, an all-gather of shards B(n-1)/n) are within
  1.10x of Megatron's minimum, one all-reduce of each attention's and feed-forward's output per
  block; reduce-scatters and all-gathers are issued;
* sharding: the residual stream between blocks is a token shard. Every norm on it runs on half
  the tokens one rank (and plain TP, which keeps the stream whole) gives it, except the first
  block's pre-norms (before the first reduce-scatter: at most 2, image and text); and the norms
  and pointwise ops on the residual streams (outputs ``[B, S, hidden]``) touch at most 0.70x
  the elements they touch on one rank (ideal 0.5; the embeddings and the first block's
  modulation read whole inputs).

A model whose tokens do not divide by the degree keeps its all-reduces, and the report says so.
Test code may name model attributes (the blocks, attention and feed-forward classes); the
package does not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from tests.models.test_tensor_parallel import _sublayers
from xdit_compile.testing.harness import run_spmd

MODELS = [("examples.tiny_dits:make", "pixart"), ("examples.tiny_dits:make", "sd3"),
          ("examples.tiny_dits:make", "flux"), ("examples.tiny_dits_more:make_more", "wan"),
          ("examples.tiny_dits_more:make_more", "cogview4")]
ODD = ("tests.models.test_tensor_parallel_sp:make_odd", "pixart_odd")  # 3x3 patches: 9 tokens
TOL = 1e-4
MAX_TRAFFIC = 1.10
HIDDEN = 64  # the tiny models' hidden size (4 heads x 16): the residual streams are [B, S, 64]
MAX_POINTWISE = 0.70  # norm + pointwise elements on the residual streams: this rank's / one rank's
WHOLE_NORMS = 2  # norms before the first reduce-scatter (the first block's pre-norms of image and text)
OPTIONS = {"tensor_parallel_degree": 2, "tp_sequence_shard": True, "inner": "eager"}


def make_odd(name: str, batch: int = 2, seed: int = 0):
    """PixArt on a 6x6 latent (3x3 = 9 patch tokens): tokens that 2 ranks do not divide."""
    import torch

    from examples.tiny_dits import make

    model, inputs = make("pixart", batch=batch, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["hidden_states"] = torch.randn(batch, 4, 6, 6, generator=g)
    return model, inputs


@dataclass(frozen=True)
class SpResult:
    name: str
    rank: int
    rel_err: float
    received: float  # bytes the collectives delivered to this rank in one call
    megatron: float  # one all-reduce (2B(n-1)/n received) of every attention / feed-forward output
    kinds: tuple[tuple[str, int], ...]  # (collective, calls)
    pointwise: tuple[int, int]  # norm + pointwise output elements on the residual streams: (this rank, one rank)
    norms: tuple[tuple[int, ...], tuple[int, ...]]  # each norm's output elements, in order: (this rank, one rank)
    report: str


def _received(records) -> float:
    """Bytes delivered to this rank (records hold the bytes this rank handed over, and the group size)."""
    total = 0.0
    for r in records:
        n = r.group_size
        if r.kind == "all_reduce":
            total += 2 * r.nbytes * (n - 1) / n
        elif r.kind == "all_gather":
            total += r.nbytes * (n - 1)
        else:  # reduce-scatter, all-to-all: 1/n of what was handed stays here
            total += r.nbytes * (n - 1) / n
    return total


class _Count:
    """Output elements of the norms (each, in order) and of the norms + pointwise ops on the
    residual streams (outputs ``[B, S, hidden]``: residual adds, norms, modulation, gating)."""

    def __init__(self, hidden: int) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        norms = {aten.native_layer_norm, aten.layer_norm, aten.rms_norm, aten._fused_rms_norm}
        pointwise = {aten.add, aten.mul, aten.sub, aten.div, aten.addcmul, aten.silu, aten.gelu, aten.tanh,
                     aten.rsqrt, aten.pow, aten.mean}
        self.norms: list[int] = []
        self.point = 0
        count = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                first = out[0] if isinstance(out, tuple) else out
                if isinstance(first, torch.Tensor) and first.is_floating_point() and first.dim() == 3 \
                        and first.shape[-1] == hidden:
                    if func._overloadpacket in norms:
                        count.norms.append(first.numel())
                        count.point += first.numel()
                    elif func._overloadpacket in pointwise:
                        count.point += first.numel()
                return out

        self.mode = Mode()


def _sp_job(models: list[tuple[str, str]], options: dict) -> list[SpResult]:
    """Per model: the single-rank reference (eager, counted), then the compiled per-rank program
    (its graphs run once more under the counter)."""
    import torch
    import torch.distributed as dist

    import xdit_compile
    from xdit_compile.backend import clear_graphs, compiled_graphs
    from xdit_compile.runtime.collectives import record_collectives
    from xdit_compile.testing.parity import _first_tensor, load_factory

    os.environ.setdefault("XDIT_STRICT", "1")
    os.environ["XDIT_KEEP_GRAPHS"] = "1"
    n = options.get("tensor_parallel_degree", dist.get_world_size())  # the tp group: Megatron's all-reduces
    results = []
    for factory, name in models:
        xdit_compile.clear_reports()
        clear_graphs()
        torch._dynamo.reset()
        model, inputs = load_factory(factory)(name, batch=2, seed=0)
        sizes: list[int] = []

        def hook(_m, _a, out) -> None:
            outs = out if isinstance(out, tuple) else (out,)
            sizes.append(sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor)))

        handles = [m.register_forward_hook(hook) for m in _sublayers(model)]
        whole = _Count(HIDDEN)
        with torch.no_grad(), whole.mode:
            ref = _first_tensor(model(**inputs, return_dict=False))
        for h in handles:
            h.remove()
        compiled = torch.compile(model, backend="xdit", options=dict(options))
        mine = _Count(HIDDEN)
        with torch.no_grad():
            compiled(**inputs, return_dict=False)
            with record_collectives() as log:
                out = _first_tensor(compiled(**inputs, return_dict=False))
            with mine.mode:
                for _, gm, ex in compiled_graphs():
                    gm(*ex)
        kinds: dict[str, int] = {}
        for r in log:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        results.append(SpResult(name, dist.get_rank(), float((out - ref).abs().max() / ref.abs().max()),
                                _received(log), 2 * sum(sizes) * (n - 1) / n, tuple(sorted(kinds.items())),
                                (mine.point, whole.point), (tuple(mine.norms), tuple(whole.norms)),
                                "\n".join(str(r) for r in xdit_compile.reports())))
    return results


_cache: list[list[SpResult]] = []


def _results() -> list[list[SpResult]]:
    if not _cache:
        _cache.extend(run_spmd(_sp_job, 2, [*MODELS, ODD], OPTIONS, timeout=900))
    return _cache


@pytest.mark.parametrize("model", [m for _, m in MODELS])
def test_tp2_sequence_shard_exact_with_megatron_bytes_and_token_shards(model: str) -> None:
    names = [m for _, m in MODELS]
    for results in _results():
        r = results[names.index(model)]
        assert r.rel_err < TOL, f"{model} rank {r.rank}: rel err {r.rel_err}\n{r.report}"
        traffic = r.received / r.megatron
        assert traffic <= MAX_TRAFFIC, (f"{model} rank {r.rank}: {r.received:.0f} bytes received = {traffic:.3f}x "
                                        f"Megatron's minimum {r.megatron:.0f} ({r.kinds})\n{r.report}")
        kinds = dict(r.kinds)
        assert kinds.get("reduce_scatter", 0) >= 2 and kinds.get("all_gather", 0) >= 2, f"{model}: {r.kinds}\n{r.report}"
        point = r.pointwise[0] / r.pointwise[1]
        # Matched by size, not position: a norm whose output the model drops is in eager, not in the graph.
        mine, whole = r.norms
        sizes = set(whole)
        full = sum(a in sizes for a in mine)
        halved = sum(2 * a in sizes and a not in sizes for a in mine)
        assert full <= WHOLE_NORMS and halved == len(mine) - full and point <= MAX_POINTWISE, (
            f"{model} rank {r.rank}: {halved} of {len(mine)} norms on a token shard ({mine} vs one rank's {whole}); "
            f"norm + pointwise elements {point:.3f}x of one rank's\n{r.report}")
        assert "reduce_scatter at" in r.report


def test_tokens_that_do_not_divide_keep_the_all_reduce() -> None:
    for results in _results():
        r = results[-1]
        assert r.rel_err < TOL, f"rank {r.rank}: rel err {r.rel_err}\n{r.report}"
        assert "do not divide by tensor_parallel_degree 2" in r.report, r.report
        assert "reduce_scatter" not in dict(r.kinds), r.kinds  # every partial sum all-reduced, as plain TP
        assert r.norms[0] == r.norms[1], r.norms  # the residual stream whole on every rank


# ---------------------------------------------------------------------- the plan, on captured graphs (no processes)
def _captured(factory: str, name: str):
    import torch

    from xdit_compile.testing.parity import load_factory

    model, inputs = load_factory(factory)(name, batch=2, seed=0)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(**inputs, return_dict=False)
    assert len(graphs) == 1
    return graphs[0]


def test_plan_reduce_scatters_every_block_output_at_the_same_bytes() -> None:
    """PixArt (2 blocks: self-attention, cross-attention, MLP): all six row-parallel outputs are
    reduce-scattered (``P -> S(1)``) instead of all-reduced, at no more bytes than plain TP; the
    caption projection (read only by the K/V projections) and the timestep MLP ([B, D]) keep
    their all-reduces; off by default, the plan is plain TP's."""
    from xdit_compile.placements import Partial, Replicate, Shard
    from xdit_compile.plan import ParallelPlan
    from xdit_compile.tensor_parallel import choose_tp

    gm = _captured("examples.tiny_dits:make", "pixart")
    plain = choose_tp(gm, 2, {}, plan=ParallelPlan(tp=2))
    again = choose_tp(gm, 2, {}, plan=None)
    sp = choose_tp(gm, 2, {}, plan=ParallelPlan(tp=2, tp_sequence_shard=True))

    def moves(prop, src, dst):
        return {x.name for d in prop.decisions.values() for x, want in d.needs.items()
                if isinstance(prop.placements.get(x), src) and isinstance(want, dst)}

    assert plain.comm_bytes == again.comm_bytes and moves(plain, Partial, Replicate) == moves(again, Partial, Replicate)
    assert len(moves(plain, Partial, Replicate)) == 8 and not moves(plain, Partial, Shard)
    assert len(moves(sp, Partial, Shard)) == 6, moves(sp, Partial, Shard)
    assert len(moves(sp, Partial, Replicate)) == 2  # caption projection, timestep MLP
    assert sp.comm_bytes <= plain.comm_bytes


def test_plan_option_is_a_bool() -> None:
    from xdit_compile.errors import PlanError
    from xdit_compile.plan import ParallelPlan

    assert ParallelPlan.from_options({"tensor_parallel_degree": 2, "tp_sequence_shard": True}).tp_sequence_shard
    with pytest.raises(PlanError, match="tp_sequence_shard='yes'"):
        ParallelPlan.from_options({"tp_sequence_shard": "yes"})
    with pytest.raises(PlanError, match="pass tensor_parallel_degree=2"):
        ParallelPlan.from_options({"ulysses_degree": 2, "tp_sequence_shard": True})
