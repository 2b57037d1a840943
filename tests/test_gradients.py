"""Backward through compiled models is exact: input and weight gradients equal one rank's.

Tiny diffusers DiTs (PixArt: cross attention; Flux: joint attention with RoPE) under Ulysses 2,
Ring 2 and CFG 2 on 2 ranks, USP 2x2 and CFG 2 x Ulysses 2 (two axes, each with its gradient
syncs) on 4; the loss is ``(out * fixed_random).sum()``. Every
rank computes the single-rank reference gradients itself, eagerly, before compiling. Each
gradient is compared with the reference within 1e-4 of its scale: the largest entry of the
reference gradient, floored at 1e-3 of the largest over all parameters (a key bias has a
gradient that is zero up to rounding, since softmax ignores a shift shared by every key).
One inductor case (aot_autograd traces the gradient rules into the joint graph), a loss reduced
over the sharded tokens inside the compiled function (partial sums and all-reduces), a forward
under grad mode that is never differentiated, and a convolution net whose halo exchanges have no
gradient rules (backward raises ``GradientError``). One spawn per world size. In one process:
the lowered graph of a block syncs each weight's gradient once, and only when marked for autograd.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

import xdit_compile
from xdit_compile.testing.harness import run_spmd

TOL = 1e-4
PLANS2 = {"ulysses2": {"ulysses_degree": 2}, "ring2": {"ring_degree": 2}, "cfg2": {"use_cfg_parallel": True}}
PLANS4 = {"usp2x2": {"ulysses_degree": 2, "ring_degree": 2},
          "cfg2xulysses2": {"use_cfg_parallel": True, "ulysses_degree": 2}}
# The attention lowering each plan must show in the report (CFG splits the batch: none).
LOWERED = {"ulysses2": "ulysses", "ring2": "ring", "cfg2": "", "usp2x2": "usp", "ulysses2_inductor": "ulysses",
           "cfg2xulysses2": "ulysses"}
MODELS2 = ("pixart", "flux")
MODELS4 = ("flux",)


class _Block(nn.Module):
    """Self-attention and MLP on tokens, small enough for an inductor compile of forward and backward."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, d = hidden_states.shape
        q, k, v = self.qkv(self.norm(hidden_states)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        h = hidden_states + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return (h + self.mlp(h),)


def _make(name: str) -> tuple[nn.Module, dict[str, Any]]:
    if name == "block":
        torch.manual_seed(0)
        return _Block().eval(), {"hidden_states": torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))}
    from examples.tiny_dits import make

    return make(name)


def _call(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    if isinstance(model, _Block) or isinstance(getattr(model, "_orig_mod", None), _Block):
        return model(**inputs)[0]
    return model(**inputs, return_dict=False)[0]


def _grads(model: nn.Module, inputs: dict[str, Any], fn: Any, weight: torch.Tensor | None) -> dict[str, Any]:
    """Output, input gradient and parameter gradients of ``(fn(**inputs) * weight).sum()``."""
    model.zero_grad(set_to_none=True)
    hs = inputs["hidden_states"]
    hs.grad = None
    out = _call(fn, inputs)
    if weight is None:
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weight).sum().backward()
    return {"out": out.detach(), "weight": weight, "input": hs.grad.clone(),
            "params": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def _compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    floor = 1e-3 * max(g.abs().max().item() for g in ref["params"].values())
    worst, worst_name = 0.0, ""
    for name, r in ref["params"].items():
        g = got["params"].get(name, torch.zeros_like(r))  # a missing grad must have been zero
        err = (g - r).abs().max().item() / max(r.abs().max().item(), floor)
        if err > worst:
            worst, worst_name = err, name
    missing = sorted(set(got["params"]) - set(ref["params"]))
    return {
        "out": (got["out"] - ref["out"]).abs().max().item() / ref["out"].abs().max().item(),
        "input": (got["input"] - ref["input"]).abs().max().item() / ref["input"].abs().max().item(),
        "param": worst, "param_name": worst_name, "extra_grads": missing,
        "checked": len(ref["params"]),
    }


def _split() -> dict[str, Any]:
    """Whether the compiled graphs really ran in parallel, and how attention was lowered."""
    reports = xdit_compile.reports()
    split = bool(reports) and all(not r.fallback and any(ax.seeds or ax.forced for ax in r.axes) for r in reports)
    lowered = [low for r in reports for ax in r.axes for _, _, low in ax.attention]
    return {"split": split, "lowered": lowered, "report": "\n".join(str(r) for r in reports)}


def gradient_job(models: tuple[str, ...], plans: dict[str, dict], extra: bool) -> list[dict[str, Any]]:
    """Per rank: every (model, plan) case, plus (``extra``) the inductor and no-backward cases."""
    results = []
    cases = [(m, p, {"inner": "eager", **o}) for m in models for p, o in plans.items()]
    if extra:
        cases.append(("block", "ulysses2_inductor", {"inner": "inductor", "ulysses_degree": 2}))
    refs: dict[str, tuple[nn.Module, dict[str, Any], dict[str, Any]]] = {}
    for model_name, plan, options in cases:
        if model_name not in refs:
            model, inputs = _make(model_name)
            inputs["hidden_states"].requires_grad_(True)
            refs[model_name] = (model, inputs, _grads(model, inputs, model, None))
        model, inputs, ref = refs[model_name]
        torch._dynamo.reset()
        xdit_compile.clear_reports()
        start = time.perf_counter()
        compiled = torch.compile(model, backend="xdit", options=options)
        got = _grads(model, inputs, compiled, ref["weight"])
        results.append({"case": f"{model_name}/{plan}", **_compare(ref, got), **_split(),
                        "seconds": time.perf_counter() - start})
    if extra:
        # Grad mode on, never differentiated: forward exact, twice (graphs keep no stale state).
        model, inputs, ref = refs[models[0]]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="xdit", options={"inner": "eager", "ulysses_degree": 2})
        outs = [_call(compiled, inputs) for _ in range(2)]
        err = max((o.detach() - ref["out"]).abs().max().item() for o in outs) / ref["out"].abs().max().item()
        results.append({"case": "forward_only", "out": err, "requires_grad": all(o.requires_grad for o in outs)})
        results.append(_refused_case())
        results.append(_loss_inside_case(*refs["flux"][:2]))
    return results


def _refused_case() -> dict[str, Any]:
    """Convolutions and GroupNorm over sharded rows (halo exchange, global statistics): no gradient
    rules, so the forward is exact and backward raises GradientError naming those ops."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    ref = net(x).detach()
    torch._dynamo.reset()
    xdit_compile.clear_reports()
    out = torch.compile(net, backend="xdit", options={"inner": "eager", "ulysses_degree": 2})(x)
    try:
        out.sum().backward()
        raised = "no error"
    except xdit_compile.GradientError as e:
        raised = f"GradientError: {e}"
    return {"case": "halo_refused", "out": (out.detach() - ref).abs().max().item() / ref.abs().max().item(),
            "raised": raised, **_split()}


def _loss_inside_case(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """A training step's loss computed inside the compiled function: means and a std over the
    sharded tokens become partial sums plus all-reduces, whose backward passes the gradient on."""
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))

    def step(**kw: Any) -> torch.Tensor:
        out = model(**kw, return_dict=False)[0]
        return ((out - target) ** 2).mean() + out.std(dim=1).sum()

    def grads(fn: Any) -> dict[str, Any]:
        model.zero_grad(set_to_none=True)
        inputs["hidden_states"].grad = None
        loss = fn(**inputs)
        loss.backward()
        return {"out": loss.detach().reshape(1), "input": inputs["hidden_states"].grad.clone(),
                "params": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}

    ref = grads(step)
    torch._dynamo.reset()
    xdit_compile.clear_reports()
    got = grads(torch.compile(step, backend="xdit", options={"inner": "eager", "ulysses_degree": 2}))
    split = _split()
    return {"case": "flux_loss_inside/ulysses2", **_compare(ref, got), **split,
            "all_reduce": "all_reduce" in split["report"]}


_cache: dict[int, list[list[dict[str, Any]]]] = {}


def _world(size: int) -> list[list[dict[str, Any]]]:
    if size not in _cache:
        args = (MODELS2, PLANS2, True) if size == 2 else (MODELS4, PLANS4, False)
        # XDIT_STRICT: an internal pass error raises instead of running replicated (vacuously exact).
        _cache[size] = run_spmd(gradient_job, size, *args, timeout=600, env={"XDIT_STRICT": "1"})
    return _cache[size]


def _case(size: int, name: str) -> list[dict[str, Any]]:
    return [next(r for r in per_rank if r["case"] == name) for per_rank in _world(size)]


CASES = [(2, f"{m}/{p}") for m in MODELS2 for p in PLANS2] + [(4, f"{m}/{p}") for m in MODELS4 for p in PLANS4] + [
    (2, "block/ulysses2_inductor"), (2, "flux_loss_inside/ulysses2")]


@pytest.mark.parametrize("size,name", CASES, ids=[n for _, n in CASES])
def test_gradients_equal_one_rank(size: int, name: str) -> None:
    for rank, r in enumerate(_case(size, name)):
        where = f"{name} rank {rank}"
        assert r["out"] <= TOL, f"{where}: forward error {r['out']}"
        assert r["input"] <= TOL, f"{where}: input-gradient error {r['input']}"
        assert r["param"] <= TOL, f"{where}: gradient of {r['param_name']} off by {r['param']} of its scale"
        assert not r["extra_grads"], f"{where}: gradients where one rank has none: {r['extra_grads']}"
        assert r["checked"] >= 10
        assert r["split"], f"{where}: ran replicated\n{r['report']}"
        strategy = LOWERED[name.split("/")[1]]
        if strategy:
            assert any(low.startswith(strategy) for low in r["lowered"]), f"{where}: {r['lowered']}"


def test_loss_reduced_inside_the_compiled_function() -> None:
    assert all(r["all_reduce"] for r in _case(2, "flux_loss_inside/ulysses2"))  # P -> R was exercised


def test_forward_under_grad_mode_without_backward() -> None:
    for r in _case(2, "forward_only"):
        assert r["out"] <= TOL and r["requires_grad"], r


def test_ops_without_gradient_rules_refuse_backward() -> None:
    for r in _case(2, "halo_refused"):
        assert r["split"] and r["out"] <= TOL, r
        assert r["raised"].startswith("GradientError: backward through a graph"), r["raised"]
        assert "xdit_halo" in r["raised"] and "xdit_group_norm" in r["raised"], r["raised"]


# ---------------------------------------------------------------- single process: the lowered graph
def _lowered(marked: bool) -> fx.GraphModule:
    from xdit_compile.axis import Axis
    from xdit_compile.gradients import mark_for_autograd
    from xdit_compile.graph import is_user_input
    from xdit_compile.passes.lower import lower
    from xdit_compile.passes.propagate import propagate
    from xdit_compile.placements import shard

    graphs = []

    def backend(gm: fx.GraphModule, example_inputs: list) -> Any:
        graphs.append((gm, example_inputs))
        return gm.forward

    model, inputs = _make("block")
    torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    gm, example_inputs = graphs[0]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and is_user_input(n))
    prop = propagate(gm, 2, {x: shard(1, 16)})
    prop.seeds = {x: shard(1, 16)}
    if marked:
        mark_for_autograd(gm, example_inputs)
    lower(gm, prop, Axis("sp", 2, 0, "unused"))
    return gm


def test_lowering_for_autograd_syncs_each_weight_once() -> None:
    from xdit_compile.gradients import undifferentiable_ops
    from xdit_compile.graph import op_name

    gm = _lowered(marked=True)
    weights = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta["example_value"], nn.Parameter)]
    syncs = [n for n in gm.graph.nodes if op_name(n) == "xdit_grad_sync"]
    # Every weight is read next to the token shard: one sync each, and nothing else is synced.
    assert sorted(s.args[0].name for s in syncs) == sorted(w.name for w in weights)
    assert all(len(w.users) == 1 for w in weights)
    slices = [n for n in gm.graph.nodes if op_name(n) == "xdit_slice"]
    assert slices and all(s.args[3] == "unused" for s in slices)  # the group its backward gathers over
    assert undifferentiable_ops(gm) == []


def test_lowering_for_inference_adds_no_gradient_plumbing() -> None:
    from xdit_compile.gradients import undifferentiable_ops
    from xdit_compile.graph import op_name

    gm = _lowered(marked=False)
    assert not [n for n in gm.graph.nodes if op_name(n) == "xdit_grad_sync"]
    # Such a graph must not be differentiated: the guard would see its slice as having no rule.
    assert undifferentiable_ops(gm) == ["xdit_slice (lowered without the group its backward gathers over)"]


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("block_rows", [None, 4])
def test_attention_backward_equals_sdpa_autograd(gqa: bool, block_rows: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The written-out backward the sequence-parallel attention uses: SDPA's gradients, in float64,
    with a bool mask hiding every key from one query (SDPA gives that row 0), in blocks of query rows."""
    from xdit_compile.runtime import attention_grad

    if block_rows is not None:
        monkeypatch.setattr(attention_grad, "_BLOCK_ELEMENTS", 2 * 4 * 30 * block_rows)
    g = torch.Generator().manual_seed(0)
    heads_kv = 2 if gqa else 4
    q = torch.randn(2, 4, 13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, heads_kv, 30, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 1, 13, 30, generator=g) > 0.3
    mask[:, :, 0] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=0.3)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    want = torch.autograd.grad(out, (q, k, v), grad)
    got = attention_grad.attention_backward(q.detach(), k.detach(), v.detach(), mask, 0.3, grad)
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-12)
