"""A new resolution or batch size under torch.compile's default ``dynamic=None`` stays parallel.

Dynamo recompiles the second shape with symbolic sizes; the backend specialises that graph per
concrete shape (``xdit_compile/specialize.py``). On 2 ranks, each case compiles a tiny DiT with
the default ``dynamic``, calls it at resolution A, then B, then B with a larger batch, and checks
every call against the single-rank eager output (exact methods: within 1e-4 of the scale), that
the per-rank program of each new shape does about 1/N of the FLOPs, and that its plan report
shows sharded inputs. One spawn runs every case.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
import torch.fx as fx

from xdit_compile.specialize import PerShape, specialise, symbolic_inputs
from xdit_compile.testing.harness import run_spmd

TOL = 1e-4

# (batch, latent height and width) of the calls: A, then B, then B with a larger batch.
SHAPES = [(2, 16), (2, 24), (4, 24)]
# (model, options, per-rank FLOPs limit as a fraction of one rank's, how many of SHAPES to call)
CASES: list[tuple[str, dict[str, Any], float, int]] = [
    ("pixart", {"ulysses_degree": 2, "inner": "eager"}, 0.62, 3),
    ("sd3", {"ulysses_degree": 2, "inner": "eager"}, 0.62, 3),
    ("pixart", {"use_cfg_parallel": True, "inner": "eager"}, 0.55, 3),
    ("sd3", {"use_cfg_parallel": True, "inner": "eager"}, 0.55, 3),
    ("dit", {"ulysses_degree": 2, "inner": "inductor"}, 0.62, 2),  # inductor compiles cost ~5 s each
]


def _resize(inputs: dict[str, Any], batch: int, size: int, seed: int) -> dict[str, Any]:
    """The model's example inputs at another batch and latent resolution (same kinds of tensors)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in inputs.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
            continue
        shape = list(v.shape)
        shape[0] = batch
        if k == "hidden_states":
            shape[-2:] = [size, size]
        if v.is_floating_point():
            out[k] = torch.randn(*shape, generator=g)
        else:
            out[k] = torch.randint(0, 1000, shape, generator=g)
    return out


class _DataDependent(torch.nn.Module):
    """Sizes that depend on data (``nonzero``): they stay symbolic in every specialisation."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        keep = (h[0, :, 0] > 0).nonzero().squeeze(1)
        return h[:, keep].sum(1) + h.mean(1)


def _dits() -> list[dict[str, Any]]:
    """Every case of ``CASES`` on this rank: errors per call, per-rank FLOPs of each shape's program, reports."""
    import xdit_compile
    from examples.tiny_dits import make
    from xdit_compile.backend import clear_graphs, compiled_graphs
    from xdit_compile.testing.parity import _first_tensor, _flops

    results = []
    for name, options, _, n_shapes in CASES:
        torch._dynamo.reset()
        xdit_compile.clear_reports()
        clear_graphs()
        model, base = make(name)
        compiled = torch.compile(model, backend="xdit", options=dict(options))
        calls, start = [], time.perf_counter()
        with torch.no_grad():
            for i, (batch, size) in enumerate(SHAPES[:n_shapes]):
                inputs = _resize(base, batch, size, seed=10 + i)
                ref, ref_flops = _flops(lambda: _first_tensor(model(**inputs, return_dict=False)))
                out = _first_tensor(compiled(**inputs, return_dict=False))
                graphs = compiled_graphs()
                clear_graphs()
                # Dynamo runs no compiled frame under a dispatch mode: count the per-rank graphs.
                flops = sum(_flops(lambda: gm(*args))[1] for _, gm, args in graphs)
                calls.append(dict(
                    err=float((out - ref).abs().max()), scale=float(ref.abs().max()), flops=flops,
                    ref_flops=ref_flops, graphs=len(graphs), reports=[str(r) for r, _, _ in graphs],
                    seeds=[sum(len(a.seeds) for a in r.axes) for r, _, _ in graphs],
                    fallback=[r.fallback for r, _, _ in graphs]))
        results.append(dict(calls=calls, seconds=time.perf_counter() - start))
    return results


def _pipefusion(free_unused_parameters: bool) -> dict[str, Any]:
    """PipeFusion 2 (one patch: exact) over a short Euler loop at resolution A, then B, then A again."""
    import xdit_compile
    from tests.pipefusion.jobs import euler_loop
    from examples.tiny_dits import make
    from xdit_compile import pipefusion

    torch._dynamo.reset()
    xdit_compile.clear_reports()
    pipefusion.clear_reports()
    pipefusion.configure(free_unused_parameters=free_unused_parameters)
    model, base = make("pixart")
    inputs = [_resize(base, 2, size, seed=20 + i) for i, size in enumerate((16, 24, 16))]
    start = time.perf_counter()
    with torch.no_grad():
        refs = [euler_loop(model, "pixart", x, 2) for x in inputs]  # before PipeFusion frees weights
        compiled = torch.compile(model, backend="xdit", options={"pipefusion_parallel_degree": 2,
                                                                  "num_pipeline_patch": 1, "inner": "eager"})
        errs = []
        try:
            for x, ref in zip(inputs, refs):
                pipefusion.reset()
                errs.append(float((euler_loop(compiled, "pixart", x, 2) - ref).abs().max() / ref.abs().max()))
        except Exception as e:  # reported to the test, which names it
            return dict(error=f"{type(e).__name__}: {e}", errs=errs)
    return dict(error=None, errs=errs, reports=[str(r) for r in xdit_compile.reports()],
                stages=[r.stage for r in pipefusion.reports()], seconds=time.perf_counter() - start)


def _data_dependent() -> dict[str, Any]:
    """Ulysses 2 on a graph with a data-dependent size, at two sequence lengths."""
    import xdit_compile

    torch._dynamo.reset()
    xdit_compile.clear_reports()
    torch.manual_seed(0)
    model = _DataDependent().eval()
    compiled = torch.compile(model, backend="xdit", options={"ulysses_degree": 2, "inner": "eager"})
    errs = []
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for tokens in (8, 12):
            x = torch.randn(2, tokens, 16, generator=torch.Generator().manual_seed(tokens))
            ref = model(x)
            errs.append(float((compiled(x) - ref).abs().max() / ref.abs().max()))
    return dict(errs=errs, reports=[str(r) for r in xdit_compile.reports()])


def _job() -> dict[str, Any]:
    os.environ["XDIT_STRICT"] = "1"
    os.environ["XDIT_KEEP_GRAPHS"] = "1"
    return dict(dits=_dits(), pipefusion_kept=_pipefusion(False), pipefusion=_pipefusion(True),
                data_dependent=_data_dependent())


@pytest.fixture(scope="module")
def per_rank() -> list[dict[str, Any]]:
    return run_spmd(_job, 2, timeout=600)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m}-{'-'.join(k for k in o if k != 'inner')}-{o['inner']}"
                                                         for m, o, _, _ in CASES])
def test_new_shapes_parallel_and_exact(per_rank: list[dict[str, Any]], case: int) -> None:
    name, options, limit, _ = CASES[case]
    for rank, results in enumerate(per_rank):
        res = results["dits"][case]
        for (batch, size), call in zip(SHAPES, res["calls"]):
            where = f"{name} {options} rank {rank} batch {batch} size {size}"
            assert call["err"] < TOL * call["scale"], f"{where}: err {call['err']} (scale {call['scale']})"
            # Each shape compiles one graph (A statically, B and B x2 through the specialisation).
            assert call["graphs"] == 1, f"{where}: {call['graphs']} graphs compiled\n" + "\n".join(call["reports"])
            report = call["reports"][0]
            assert call["fallback"] == [None], f"{where}\n{report}"
            assert call["seeds"][0] > 0, f"{where}: nothing sharded\n{report}"
            assert call["flops"] < limit * call["ref_flops"], (
                f"{where}: {call['flops']} FLOPs per rank vs {call['ref_flops']} on one rank\n{report}")
        for call in res["calls"][1:]:
            assert "specialised to" in call["reports"][0], call["reports"][0]


def _check_pipefusion(per_rank: list[dict[str, Any]], key: str) -> None:
    for rank, results in enumerate(per_rank):
        res = results[key]
        assert res["error"] is None, f"rank {rank}: {res['error']}"
        assert max(res["errs"]) < TOL, (res["errs"], res["reports"])
        # A pipeline for A, one for B (A again may reuse either: Dynamo picks), each on this rank's stage.
        assert len(res["stages"]) >= 2 and set(res["stages"]) == {rank}, res["stages"]
        assert all("pp=2" in r for r in res["reports"]) and "specialised to" in res["reports"][-1], res["reports"]


def test_pipefusion_new_shape_weights_kept(per_rank: list[dict[str, Any]]) -> None:
    _check_pipefusion(per_rank, "pipefusion_kept")


def test_pipefusion_new_shape(per_rank: list[dict[str, Any]]) -> None:
    _check_pipefusion(per_rank, "pipefusion")


def test_data_dependent_sizes_stay_parallel(per_rank: list[dict[str, Any]]) -> None:
    for results in per_rank:
        res = results["data_dependent"]
        assert max(res["errs"]) < TOL, res
        last = res["reports"][-1]
        assert "specialised to" in last and "sharded inputs: L['x'] S(1)" in last, last


# ----------------------------------------------------------------- one process, no spawn
def _symbolic_graph() -> tuple[fx.GraphModule, list[Any]]:
    """A graph Dynamo hands over on a second shape (``dynamic=None``), captured with a spy backend."""
    got: list[tuple[fx.GraphModule, list[Any]]] = []

    def spy(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        got.append((gm, list(example_inputs)))
        return gm.forward

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.arange(x.shape[1] // 2, dtype=x.dtype) + x.reshape(x.shape[0], x.shape[1] // 2, 2).sum(-1)

    torch._dynamo.reset()
    c = torch.compile(f, backend=spy)
    c(torch.randn(2, 8))
    c(torch.randn(2, 12))
    return got[-1]


def test_specialise_folds_sizes() -> None:
    gm, _ = _symbolic_graph()
    assert symbolic_inputs(gm)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x = torch.randn(2, 20)
    args = [20 if isinstance(n.meta["example_value"], torch.SymInt) else x for n in phs]  # the SymInt is x.shape[1]
    static = specialise(gm, args)
    assert not symbolic_inputs(static)
    for node in static.graph.nodes:
        v = node.meta["val"]
        assert not isinstance(v, torch.SymInt) and (not isinstance(v, torch.Tensor) or all(isinstance(s, int) for s in v.shape))
        assert node.op in ("placeholder", "output") or isinstance(v, torch.Tensor), f"{node.name} not folded"
    want = torch.arange(10.0) + x.reshape(2, 10, 2).sum(-1)
    out = static(*args)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, want)


def test_per_shape_caches_by_signature() -> None:
    gm, _ = _symbolic_graph()
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    built: list[fx.GraphModule] = []

    def compile_static(g: fx.GraphModule, ex: list[Any]) -> Any:
        built.append(g)
        return g.forward

    fn = PerShape(gm, compile_static, cache_size=2)
    for cols in (8, 12, 8, 16, 12):
        x = torch.randn(2, cols)
        args = [cols if isinstance(n.meta["example_value"], torch.SymInt) else x for n in phs]
        fn(*args)
    # 8 and 12 compile, 8 hits, 16 evicts 12 (least recently used), 12 compiles again.
    assert len(built) == 4 and len(fn.cache) == 2


def test_unspecialisable_shape_warns_and_reports(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A shape that cannot be specialised runs replicated with a WARNING and a report naming cause and fix;
    under PipeFusion it raises PlanError."""
    import torch.distributed as dist

    import xdit_compile
    from xdit_compile import specialize
    from xdit_compile.plan import ParallelPlan

    gm, example_inputs = _symbolic_graph()
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x = torch.randn(2, 20)
    args = [20 if isinstance(n.meta["example_value"], torch.SymInt) else x for n in phs]

    def boom(*_: Any) -> Any:
        raise RuntimeError("no fake kernel for some op")

    monkeypatch.setattr(specialize, "specialise", boom)
    monkeypatch.setenv("XDIT_STRICT", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        xdit_compile.clear_reports()
        inner = lambda plan, g, ex: g.forward  # noqa: E731
        fn = specialize.per_shape(gm, example_inputs, ParallelPlan(ulysses=2), lambda g, ex: g.forward, inner)
        with caplog.at_level("WARNING", logger="xdit_compile"):
            out = fn(*args)
        want = torch.arange(10.0) + x.reshape(2, 10, 2).sum(-1)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, want)
        assert "REPLICATED" in caplog.text and "dynamic=False" in caplog.text and "no fake kernel" in caplog.text
        report = xdit_compile.reports()[-1]
        assert report.fallback and "symbolic sizes" in report.fallback and "dynamic=False" in report.fallback
        pf = specialize.per_shape(gm, example_inputs, ParallelPlan(pp=2),
                                  lambda g, ex: g.forward, inner)
        with pytest.raises(xdit_compile.PlanError, match="pipefusion needs static shapes.*dynamic=False"):
            pf(*args)
    finally:
        dist.destroy_process_group()


def test_pipefusion_new_shape_keeps_stage_cuts() -> None:
    """A later graph over the same weights reuses the first graph's cuts, even where the costs moved;
    a stage that would read weights an earlier compile freed raises instead of reading empty storage."""
    from xdit_compile import PlanError
    from xdit_compile.pipefusion import entry

    graph = fx.Graph()
    w, x = graph.placeholder("l_self_w"), graph.placeholder("x")
    graph.output((w, x))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    weight, other = torch.randn(4), torch.randn(4)
    first = entry._cuts_for(gm, [weight, torch.randn(2)], [1.0, 1.0, 1.0, 1.0], 2, "")
    assert first == [1]
    # Attention grew faster than the rest at the new shape: balance alone would cut elsewhere.
    assert entry._cuts_for(gm, [weight, torch.randn(3)], [1.0, 1.0, 1.0, 9.0], 2, "") == first
    assert entry._cuts_for(gm, [other, torch.randn(3)], [1.0, 1.0, 1.0, 9.0], 2, "") == [2]  # another model
    weight.untyped_storage().resize_(0)
    with pytest.raises(PlanError, match="l_self_w.*free_unused_parameters=False"):
        entry._check_kept(gm, [weight, torch.randn(2)], {0})
