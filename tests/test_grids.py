"""Odd patch grids and Swin's shifted windows (``tests/adversarial/grid_models.py``) against one rank.

Exact checks (every rank within 1e-4 of the single-rank output's scale) and work checks
(per-rank FLOPs of the compiled graphs at most 0.55 of one rank's on 2 ranks, 0.30 on 4):

* ``odd_grid`` (15x15 patches) and ``odd_grid_14`` (7x7): the latent rows are sharded in whole
  patch rows (``S(2:15x2)``: 16 + 14 latent rows on 2 ranks; 4/4/4/2 of 14 on 4 ranks), so the
  patch embedding and everything after it stay sharded;
* ``swin`` / ``swin_flat``: ``torch.roll`` along the sharded rows (and along flat tokens) is a
  neighbour exchange that moves ``shift`` rows per rank, far less than the all-gather it replaces.

One spawn per world size: Ulysses 2 and Ring 2 on 2 ranks, USP 2x2 on 4 ranks. On 2 ranks the same
spawn checks backward under Ulysses 2 (input and weight gradients within 1e-4 of one rank's): the
roll exchange's gradient is the exchange by ``-shift``.
"""

from __future__ import annotations

from typing import Any

import pytest

from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_many

FACTORY = "tests.adversarial.grid_models:make"
TOL = 1e-4
PLANS: dict[str, tuple[int, dict[str, Any], list[str], float]] = {
    # plan: (world size, options, models, most per-rank FLOPs as a fraction of one rank's)
    "ulysses2": (2, {"ulysses_degree": 2}, ["odd_grid", "swin", "swin_flat"], 0.55),
    "ring2": (2, {"ring_degree": 2}, ["odd_grid", "swin", "swin_flat"], 0.55),
    "usp2x2": (4, {"ulysses_degree": 2, "ring_degree": 2}, ["odd_grid_14", "odd_grid", "swin"], 0.30),
}
# Bytes a rank sends per roll of the Swin grid (B=2, 16x16 patches, 64 channels, float32):
# 2 rows of 16 tokens; an all-gather would bring it (N-1)/N of the whole 131,072-byte grid.
GRID_BYTES = 2 * 16 * 16 * 64 * 4
ROLL_BYTES = 2 * 2 * 16 * 64 * 4

_cache: dict[int, dict[str, Any]] = {}
_ranks: dict[int, list[dict[str, Any]]] = {}


GRAD_MODELS = ["swin_flat", "odd_grid"]


def _gradient_errors(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Relative errors of the input and worst parameter gradient of ``(model(x, t) * w).sum()``
    compiled with ``options``, against the same model run eagerly on this rank."""
    import torch

    import xdit_compile
    from tests.adversarial.grid_models import make

    torch._dynamo.reset()
    xdit_compile.clear_reports()
    model, inputs = make(name)
    x = inputs["x"].requires_grad_(True)

    def grads(fn: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = fn(x, inputs["t"])
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
        return x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_x, ref_p = grads(model)
    got_x, got_p = grads(torch.compile(model, backend="xdit", options={**options, "inner": "eager"}))
    floor = 1e-3 * max(g.abs().max().item() for g in ref_p.values())
    param = max((got_p[n] - r).abs().max().item() / max(r.abs().max().item(), floor) for n, r in ref_p.items())
    return {"input": (got_x - ref_x).abs().max().item() / ref_x.abs().max().item(), "param": param,
            "report": "\n".join(str(r) for r in xdit_compile.reports())}


def grid_job(plans: list[str]) -> dict[str, Any]:
    """On every rank: each plan's models, single-rank reference and compiled run (one spawn); on
    2 ranks also the gradients through the sharded roll and the whole-patch shard (Ulysses 2)."""
    out: dict[str, Any] = {}
    for plan in plans:
        _, options, models, _ = PLANS[plan]
        out[plan] = parity_many(FACTORY, models, {**options, "inner": "eager"})
    if "ulysses2" in plans:
        out["gradients"] = {m: _gradient_errors(m, PLANS["ulysses2"][1]) for m in GRAD_MODELS}
    return out


def _results(plan: str) -> list[ParityResult]:
    world = PLANS[plan][0]
    if world not in _cache:
        plans = [p for p, spec in PLANS.items() if spec[0] == world]
        _ranks[world] = run_spmd(grid_job, world, plans, timeout=900)
        _cache[world] = {p: [r for per_rank in _ranks[world] for r in per_rank[p]] for p in plans}
    return _cache[world][plan]


def test_gradients_through_roll_and_patch_rows_equal_one_rank() -> None:
    _results("ulysses2")
    for rank, per_rank in enumerate(_ranks[2]):
        for model, err in per_rank["gradients"].items():
            assert err["input"] < TOL and err["param"] < TOL, f"rank {rank} {model}: gradient errors {err}"
            assert ("roll exchange" if model.startswith("swin") else "S(2:15x2)") in err["report"], err["report"]


@pytest.mark.parametrize("plan", list(PLANS))
def test_grids_exact_and_split(plan: str) -> None:
    world, _, models, max_flops = PLANS[plan]
    results = _results(plan)
    for i, r in enumerate(results):
        model = models[i % len(models)]
        assert r.fallback is None, f"{plan} {model} rank {r.rank} fell back: {r.fallback}\n{r.report}"
        assert r.rel_err < TOL, f"{plan} {model} rank {r.rank}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"
        assert r.flops <= max_flops * r.ref_flops, (
            f"{plan} {model} rank {r.rank}: {r.flops} FLOPs vs {r.ref_flops} on one rank "
            f"({r.flops / r.ref_flops:.3f} > {max_flops})\n{r.report}")
        lines = [line.strip() for line in r.report.splitlines()]
        replicated = [line for line in lines if line.startswith("replicated ") or line.endswith("-> replicated")]
        assert not replicated, f"{plan} {model}: {replicated}\n{r.report}"
        if model.startswith("odd_grid"):
            assert "S(2:15x2)" in r.report or "S(2:7x2)" in r.report, f"{model}: not sharded in whole patches\n{r.report}"
        if model.startswith("swin"):
            rolls = [nbytes for kind, nbytes, _ in r.collectives if kind == "roll"]
            assert len(rolls) == (4 if model == "swin_flat" else 2), f"{model}: rolls {r.collectives}\n{r.report}"
            assert max(rolls) <= ROLL_BYTES < GRID_BYTES * (world - 1) / world / 3, (model, rolls)
