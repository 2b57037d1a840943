"""``pipefusion.run_steps``: the pipeline kept full across steps, on 2 gloo ranks.

The step function compiles the whole Euler step (model call and update) into one graph. The
streamed loop must equal the plain per-call loop over the same compiled function bit for bit
(same patch programs, same inputs, same stale K/V), and so stay within the stale-K/V bound of
the eager single-rank loop. A step function with a graph break between the model and the
update is refused with a ``PlanError`` (its update would run on the pipeline's zeros).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from tests.pipefusion.jobs import STALE_BOUND, _build, _tensor, _timestep
from xdit_compile.testing.harness import run_spmd

STEPS = 4
CASES = [("pixart", 2), ("sd3", 4), ("flux", 2)]
HYBRID = [("pixart", 2, {"ulysses_degree": 2}), ("sd3", 2, {"use_cfg_parallel": True})]  # 4 ranks


def _step_fn(model: torch.nn.Module, inputs: dict[str, Any], graph_break: bool = False) -> Callable[..., torch.Tensor]:
    def step(x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        v = _tensor(model(**{**inputs, "hidden_states": x, "timestep": t}, return_dict=False))
        v = v[:, : x.shape[1]] if v.shape != x.shape else v
        if graph_break:
            torch._dynamo.graph_break()
        return x + dt * v

    return step


def _steps(name: str, inputs: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sigmas = torch.linspace(1.0, 1.0 / STEPS, STEPS).tolist() + [0.0]
    return [(_timestep(name, inputs, s)["timestep"], torch.tensor(s_next - s)) for s, s_next in zip(sigmas, sigmas[1:])]


def stream_job(cases: list[tuple[str, int, dict[str, Any]]], refuse: bool = True) -> list[dict[str, Any]]:
    """Per case: the eager loop, the plain compiled loop and ``run_steps``; errors and timings."""
    from xdit_compile import pipefusion
    from xdit_compile.errors import PlanError

    out = []
    for name, m, extra in cases:
        torch._dynamo.reset()
        pipefusion.reset()
        pipefusion.clear_reports()
        model, inputs = _build(name)
        steps = _steps(name, inputs)
        x0 = inputs["hidden_states"]
        with torch.no_grad():
            ref = x0
            for args in steps:
                ref = _step_fn(model, inputs)(ref, *args)
            options = {"inner": "eager", "pipefusion_parallel_degree": 2, "num_pipeline_patch": m, "warmup_steps": 1,
                       **extra}
            step = torch.compile(_step_fn(model, inputs), backend="xdit", dynamic=False, options=options)
            plain = x0
            for args in steps:
                plain = step(plain, *args)
            pipefusion.reset()
            with pipefusion.record_p2p() as log:
                streamed = pipefusion.run_steps(step, x0, steps)
        rep = pipefusion.reports()[-1]
        out.append({
            "model": name, "m": m, "patches": rep.patches, "stage": rep.stage,
            "plain_vs_stream": float((plain - streamed).abs().max()),
            "err": float((streamed - ref).abs().max() / ref.abs().max()),
            "calls": list(rep.driver.calls), "timings": [tuple(vars(t).values()) for t in rep.driver.timings],
            "p2p": [tuple(r) for r in log], "report": str(rep),
        })
    if not refuse:
        return out
    torch._dynamo.reset()
    model, inputs = _build("pixart")
    broken = torch.compile(_step_fn(model, inputs, graph_break=True), backend="xdit", dynamic=False,
                           options={"inner": "eager", "pipefusion_parallel_degree": 2, "num_pipeline_patch": 2})
    try:
        with torch.no_grad():
            pipefusion.run_steps(broken, inputs["hidden_states"], _steps("pixart", inputs))
        refused = ""
    except PlanError as e:
        refused = str(e)
    out.append({"refused": refused})
    return out


_cache: dict[int, list] = {}


def _results(world: int = 2) -> list[list[dict[str, Any]]]:
    if world not in _cache:
        cases = [(n, m, {}) for n, m in CASES] if world == 2 else HYBRID
        _cache[world] = run_spmd(stream_job, world, cases, world == 2, timeout=900)
    return _cache[world]


@pytest.mark.parametrize("case", [f"{n}_m{m}" for n, m in CASES])
def test_streamed_equals_plain_loop(case: str) -> None:
    i = [f"{n}_m{m}" for n, m in CASES].index(case)
    for rank, per_rank in enumerate(_results()):
        r = per_rank[i]
        assert r["patches"] == r["m"], r["report"]
        assert r["plain_vs_stream"] == 0.0, (case, r["plain_vs_stream"])
        assert 0 < r["err"] < STALE_BOUND, (case, r["err"])
        # Warmup step 0 in full, steps 1..3 as patches; then the same again from run_steps
        # (its warmup as a plain call, the other steps in one streamed run).
        patched = [(s, 0, s < 1) for s in range(STEPS)]
        assert r["calls"] == patched + patched, r["calls"]
        kinds = [t[0] for t in r["timings"]]
        assert kinds == ["full"] + ["patches"] * (STEPS - 1) + ["full", "stream"], kinds
        # Boundary activations go to the next stage; the last stage sends the new latent's
        # patches back to stage 0, which embeds them; the output is broadcast once at the end.
        peer = 1 - rank
        assert {(kind, p) for kind, p, _ in r["p2p"]} == {("send", peer), ("recv", peer), ("broadcast", 1)}


def test_graph_break_is_refused() -> None:
    for per_rank in _results():
        assert "one graph" in per_rank[-1]["refused"] or "unchanged" in per_rank[-1]["refused"], per_rank[-1]


@pytest.mark.parametrize("case", [f"{n}_{next(iter(o))}" for n, _, o in HYBRID])
def test_streamed_hybrid_equals_plain_loop(case: str) -> None:
    """PipeFusion 2 x Ulysses 2 and CFG 2 x PipeFusion 2 on 4 ranks: still the plain loop's result."""
    i = [f"{n}_{next(iter(o))}" for n, _, o in HYBRID].index(case)
    for per_rank in _results(4):
        r = per_rank[i]
        assert r["patches"] == r["m"], r["report"]
        assert r["plain_vs_stream"] == 0.0, (case, r["plain_vs_stream"])
        assert 0 < r["err"] < STALE_BOUND, (case, r["err"])
        assert [t[0] for t in r["timings"]][-2:] == ["full", "stream"], r["timings"]
