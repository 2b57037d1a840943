"""Data-dependent sizes captured in the graph: split at the value nodes, one program per value.

With ``torch._dynamo.config.capture_dynamic_output_shape_ops`` / ``capture_scalar_outputs`` on,
``nonzero`` and ``.item()`` stay in the graph with unbacked sizes; the backend runs the small
prefix that computes them, then compiles the rest as a static per-rank program for those values
(``xdit_compile/dynamic_values.py``). One spawn of 2 ranks (Ulysses 2, eager inner) runs:

    mochi         diffusers' Mochi (per-sample nonzero text selection in its attention processor)
    lumina2       diffusers' Lumina2 (``mask.sum(1).tolist()`` lengths, tokens packed per sample)
    select_text   own model: per-sample nonzero of the text mask before joint attention
    item_len      own model: ``mask.sum(1).max().item()`` as a slice length

each exact and at most 0.60 of one rank's FLOPs; a second call with a different mask compiles a
new program (still exact), a third with the first mask reuses the first; ranks with different
masks under ``check_inputs=False`` raise ``RankMismatchError``; and without the flags, the plan
report and one WARNING say that graph breaks run the code between graphs replicated.
Without a spawn: the report line itself, and the split of a hand-written graph.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_many

CAPTURE = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


def _captured(f: Any, *args: torch.Tensor) -> tuple[torch.fx.GraphModule, list]:
    """Dynamo's one graph of ``f`` with data-dependent sizes captured, and its example inputs."""
    graphs = []

    def keep(gm: torch.fx.GraphModule, ex: list) -> Any:
        graphs.append((gm, ex))
        return gm.forward

    with torch._dynamo.config.patch(**CAPTURE):
        torch._dynamo.reset()
        torch.compile(f, backend=keep, fullgraph=True)(*args)
    return graphs[0]
OPTIONS = {"ulysses_degree": 2, "inner": "eager"}
OWN = "tests.adversarial.dyn_models:make"
ZOO = "examples.tiny_dits_more:make_more"
OWN_MODELS = ["select_text", "item_len"]
ZOO_MODELS = ["mochi", "lumina2"]
TOL = 1e-4
MAX_FLOPS = 0.60


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs_pair(name: str) -> tuple[torch.nn.Module, dict, dict]:
    """A model, its inputs, and inputs with another valid text length."""
    if name == "mochi":
        from examples.tiny_dits_more import make_more

        model, kw = make_more("mochi")
        other = dict(kw)
        mask = kw["encoder_attention_mask"].clone()
        mask[0, 6:] = 0  # the first sample loses two text tokens too
        other["encoder_attention_mask"] = mask
        return model, kw, other
    from tests.adversarial.dyn_models import inputs, make

    model, kw = make(name)
    return model, kw, inputs(name, valid=3)


def _new_values(name: str) -> dict[str, Any]:
    """Compiled calls with the first inputs, other inputs, the first again: errors and programs."""
    import xdit_compile

    model, first, other = _inputs_pair(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="xdit", options=dict(OPTIONS))
    out: dict[str, Any] = {"errors": [], "reports": []}
    with torch.no_grad(), torch._dynamo.config.patch(**CAPTURE):
        for kw in (first, other, first):
            got = _first(compiled(**kw, return_dict=False))
            out["errors"].append(_rel(got, _first(model(**kw, return_dict=False))))
            out["reports"].append(len(xdit_compile.reports()))
    out["last"] = str(xdit_compile.reports()[-1])
    return out


def _ranks_disagree() -> str:
    """Rank 1 passes another mask, with the per-call input check off: the value agreement names it."""
    import torch.distributed as dist

    from tests.adversarial.dyn_models import inputs, make

    model, kw = make("select_text")
    if dist.get_rank() == 1:
        kw = inputs("select_text", valid=3)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="xdit", options={**OPTIONS, "check_inputs": False})
    try:
        with torch.no_grad(), torch._dynamo.config.patch(**CAPTURE):
            compiled(**kw, return_dict=False)
    except Exception as e:  # Dynamo wraps the backend's error (see FACTS.md)
        return f"{type(e).__name__}: {e}"
    return "no error"


def _graph_breaks() -> dict[str, Any]:
    """A nonzero without the capture flags: a graph break; the report and one WARNING say so."""
    import xdit_compile

    class Catch(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    def f(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x @ x.transpose(-1, -2))
        idx = torch.nonzero(m).flatten()
        return (y[:, idx] * 2).sum(-1)

    catch = Catch()
    logging.getLogger("xdit_compile").addHandler(catch)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="xdit", options=dict(OPTIONS))
        x, m = torch.randn(16, 8), torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1])
        with torch.no_grad():
            compiled(x, m)
            compiled(x, m)
    finally:
        logging.getLogger("xdit_compile").removeHandler(catch)
    return {"report": "\n".join(str(r) for r in xdit_compile.reports()),
            "warnings": [w for w in catch.lines if "graph breaks" in w]}


def _job() -> dict[str, Any]:
    return {
        "own": parity_many(OWN, OWN_MODELS, OPTIONS, dynamo_config=CAPTURE),
        "zoo": parity_many(ZOO, ZOO_MODELS, OPTIONS, dynamo_config=CAPTURE),
        "new_values": {name: _new_values(name) for name in [*OWN_MODELS, "mochi"]},
        "disagree": _ranks_disagree(),
        "breaks": _graph_breaks(),
    }


_cache: list[dict[str, Any]] = []


def _results() -> list[dict[str, Any]]:
    if not _cache:
        _cache.extend(run_spmd(_job, 2, timeout=900))
    return _cache


def _check_parity(name: str, r: ParityResult) -> None:
    assert r.fallback is None, f"{name} rank {r.rank} fell back: {r.fallback}\n{r.report}"
    assert r.rel_err < TOL, f"{name} rank {r.rank}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"
    assert "-> ulysses" in r.report, f"{name}: no attention lowered to Ulysses\n{r.report}"
    assert "data-dependent values:" in r.report, f"{name}: graph not split at its values\n{r.report}"
    assert r.flops <= MAX_FLOPS * r.ref_flops, f"{name} rank {r.rank}: {r.flops} FLOPs vs {r.ref_flops}\n{r.report}"


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_zoo_model_captured_exact_and_split(model: str) -> None:
    for res in _results():
        _check_parity(model, res["zoo"][ZOO_MODELS.index(model)])


@pytest.mark.parametrize("model", OWN_MODELS)
def test_own_model_captured_exact_and_split(model: str) -> None:
    for res in _results():
        _check_parity(model, res["own"][OWN_MODELS.index(model)])


@pytest.mark.parametrize("model", [*OWN_MODELS, "mochi"])
def test_new_mask_compiles_a_new_program(model: str) -> None:
    for res in _results():
        r = res["new_values"][model]
        assert max(r["errors"]) < TOL, f"{model}: errors {r['errors']}\n{r['last']}"
        first, second, third = r["reports"]
        assert second > first, f"{model}: another mask compiled no new program\n{r['last']}"
        assert third == second, f"{model}: the first mask again compiled again (not cached)\n{r['last']}"


def test_ranks_with_different_values_raise() -> None:
    for res in _results():
        text = res["disagree"]
        assert "RankMismatchError" in text and "data-dependent values" in text, text


def test_graph_breaks_reported_and_warned_once() -> None:
    for res in _results():
        b = res["breaks"]
        assert "GRAPH BREAKS:" in b["report"] and "nonzero" in b["report"], b["report"]
        assert "REPLICATED on every rank" in b["report"], b["report"]
        assert "capture_dynamic_output_shape_ops = True" in b["report"], b["report"]
        assert len(b["warnings"]) == 1, b["warnings"]  # once per process (the first break of this one)


def test_graph_break_line_on_one_rank(tmp_path: Any) -> None:
    """No spawn: a graph break before a graph compiled by xdit on a world of one puts the line in its report."""
    import torch.distributed as dist

    import xdit_compile
    from xdit_compile.report import graph_break_text

    def f(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(m).flatten()
        return x[:, idx].sum(-1)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        xdit_compile.clear_reports()
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="xdit", options={"inner": "eager"})
        x, m = torch.randn(4, 6), torch.tensor([1, 0, 1, 1, 0, 1])
        torch.testing.assert_close(compiled(x, m), f(x, m))
        text = str(xdit_compile.reports()[-1])
    finally:
        dist.destroy_process_group()
    assert "GRAPH BREAKS:" in text and "nonzero" in text, text
    assert "capture_scalar_outputs = True" in text, text
    line = graph_break_text({"Unsupported builtin (foo)": 2})
    assert line.startswith("2 so far (Unsupported builtin (foo) x2)") and "explain" in line and "capture" not in line


def test_split_of_a_hand_written_graph() -> None:
    """No spawn: the prefix holds only what the values need; the program takes them as inputs."""
    from xdit_compile.dynamic_values import _prefix_module, prefix_nodes, signature, substitute, value_nodes
    from xdit_compile.specialize import specialise

    def f(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(m > 0).flatten()
        n = m.sum().item()
        torch._check(n >= 0)
        torch._check(n <= x.shape[1])
        return torch.relu(x @ x.T @ x)[:, idx].sum(-1) + x[:, :n].sum(-1)

    x, m = torch.randn(4, 6), torch.tensor([1, 0, 1, 1, 0, 1])
    gm, ex = _captured(f, x, m)
    values = value_nodes(gm)
    assert sorted(str(v.target) for v in values) == sorted([str(torch.nonzero), "item"]), values
    prefix = prefix_nodes(gm, values)
    assert not any("matmul" in str(n.target) or "relu" in str(n.target) for n in prefix), prefix
    results = list(_prefix_module(gm, prefix, values)(*ex))
    sig = signature(results)
    assert sorted(map(repr, sig)) == sorted(map(repr, [((4, 1), "torch.int64"), 4])), sig
    extras = [r for r in results if isinstance(r, torch.Tensor)]
    static = specialise(substitute(gm, values, results), [*ex, *extras])
    assert not value_nodes(static)
    out = static(*ex, *extras)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, f(x, m))


def test_split_keeps_float_items_and_opens_nonzero_tuples() -> None:
    """No spawn: ``nonzero(as_tuple=True)`` gives one input per index tensor; a float ``.item()``
    (a factor, no size) stays in the program as it is."""
    from xdit_compile.dynamic_values import _prefix_module, _tensors, prefix_nodes, substitute, value_nodes
    from xdit_compile.specialize import specialise

    def f(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        s = x.abs().max().item()
        idx = torch.nonzero(m, as_tuple=True)
        return x[:, idx[0]] * s

    x, m = torch.randn(4, 6), torch.tensor([1, 0, 1, 1, 0, 1])
    gm, ex = _captured(f, x, m)
    values = value_nodes(gm)
    assert [str(v.target) for v in values] == [str(torch.nonzero)], values
    results = list(_prefix_module(gm, prefix_nodes(gm, values), values)(*ex))
    extras = _tensors(results)
    static = specialise(substitute(gm, values, results), [*ex, *extras])
    assert any(n.target == "item" for n in static.graph.nodes)
    out = static(*ex, *extras)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, f(x, m))


def test_boolean_masks_become_positions() -> None:
    """No spawn: ``x[m]``, ``x[:, m[0]]`` and ``masked_select`` select by ``nonzero`` positions of the
    mask alone, so the prefix reads no activation; the program is exact."""
    from xdit_compile.dynamic_values import (_prefix_module, _tensors, index_by_positions, prefix_nodes,
                                             substitute, value_nodes)
    from xdit_compile.passes.refresh_meta import refresh_meta
    from xdit_compile.specialize import specialise

    def f(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ x.T @ x)
        return h[m].sum() + h[:, m[0]].sum(1) + torch.masked_select(h, m[0]).sum()

    x, m = torch.randn(4, 6), torch.randn(4, 6) > 0
    gm, ex = _captured(f, x, m)
    assert index_by_positions(gm)
    refresh_meta(gm, ex)
    values = value_nodes(gm)
    assert values and all(str(v.target) == str(torch.nonzero) for v in values), values
    prefix = prefix_nodes(gm, values)
    assert not any(n.op != "placeholder" and "relu" in str(n.target) or "matmul" in str(n.target)
                   for n in prefix), prefix
    results = list(_prefix_module(gm, prefix, values)(*ex))
    extras = _tensors(results)
    static = specialise(substitute(gm, values, results), [*ex, *extras])
    out = static(*ex, *extras)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, f(x, m))


def test_selected_data_is_not_taken_out_of_the_program() -> None:
    """No spawn: a value node whose result is data (a boolean selection after an Ellipsis, left as
    written) is refused: the graph is not split, rather than run what it reads replicated."""
    from xdit_compile.dynamic_values import PerValue, Refused

    def f(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ x.T @ x)[..., m].sum(-1)

    x, m = torch.randn(4, 6), torch.tensor([True, False, True, True, False, True])
    gm, ex = _captured(f, x, m)
    with pytest.raises(Refused, match="computes data"):
        PerValue(gm, ex, lambda g, e: g.forward)


def test_per_value_caches_and_warns_about_a_heavy_prefix(caplog: pytest.LogCaptureFixture) -> None:
    """No spawn: a size read off a matmul's result splits with a WARNING (that part runs replicated,
    twice); one program per value, reused for a value seen before."""
    from xdit_compile.dynamic_values import PerValue

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n = (x @ w).argmax().item() % 5 + 1
        torch._check(n >= 1)
        torch._check(n <= x.shape[0])
        return x[:n].sum(0)

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 6, generator=g), torch.randn(6, 4, generator=g)
    gm, ex = _captured(f, x, w)
    compiled: list[int] = []

    def compile_static(g: torch.fx.GraphModule, e: list) -> Any:
        compiled.append(len(compiled))
        return g.forward

    with caplog.at_level("WARNING", logger="xdit_compile"):
        fn = PerValue(gm, ex, compile_static)
    assert "runs before the program, replicated on every rank" in caplog.text and "matmul" in caplog.text
    for args in ([x, w], [x, -w], [x, w]):
        out = fn(*args)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, f(*args))
    want = len({int((x @ v).argmax()) % 5 for v in (w, -w)})
    assert len(compiled) == want and fn.compiled == want, (compiled, want)
