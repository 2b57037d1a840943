"""CFG parallel across separate calls (``xdit_compile/branches/``) under real gloo ranks.

* Real diffusers pipelines that call the transformer once per guidance branch (Wan with a negative
  prompt; Flux with true CFG), tiny random parts, 8 steps: CFG 2 on 2 ranks and CFG 2 x Ulysses 2 on
  4 ranks. Exact check: every rank's output equals the single-rank output within 1e-4 of its scale.
  Each step after the first is a hit (its second call returns the exchanged output); per-rank
  transformer FLOPs per step after the first are counted as (runs of the per-rank program) x (FLOPs
  of one run) against the single-rank pipeline's transformer FLOPs per step (about 1/2 and 1/4).
* A hand-written sampler with three branches per step on 3 ranks (``cfg_degree=3``): exact, about
  1/3 of the FLOPs per rank; then, with the same compiled model (each run a new generation of its
  call stream: the timesteps restart), patterns that break the prediction: negative embeddings
  changing every step, a branch skipped on alternate steps, two branches swapped from some step on.
  Each exact, each reported as a miss.

Inner compiler "eager"; each rank runs the single-rank references itself. In process (no ranks):
the bitwise comparison, snapshots that see in-place writes, the options, the refusal of graphs
whose calls write state, and the step / branch state machine on a one-group stream.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch

from xdit_compile.testing import run_spmd

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
STEPS = 8


def _count_calls(module: torch.nn.Module) -> dict[str, int]:
    """Count the FLOPs and calls of ``module``'s forward from now on (eager: the reference)."""
    from xdit_compile.testing.parity import _flops

    tally = {"flops": 0, "calls": 0}
    forward = module.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        out, flops = _flops(lambda: forward(*args, **kwargs))
        tally["flops"] += flops
        tally["calls"] += 1
        return out

    module.forward = counted
    return tally


def _outcome(out: torch.Tensor, ref: torch.Tensor, ref_tally: dict[str, int], steps: int,
             since: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Error, the call stream's report and per-rank FLOPs per step after the first (vs one rank's).

    ``since``: (misses, generations) of the stream before this case (a compiled model reused).
    """
    import xdit_compile
    from xdit_compile.context import current
    from xdit_compile.testing.parity import _flops

    streams = [r for r in xdit_compile.reports() if r.calls is not None]
    got: dict[str, Any] = {"err": float((out - ref).abs().max()), "scale": float(ref.abs().max()),
                           "streams": len(streams), "fallbacks": [r.fallback for r in xdit_compile.reports() if r.fallback]}
    if streams:
        c = streams[-1].calls
        kept = [(gm, ex) for rep, gm, ex in current().graphs if rep is streams[-1]]
        per_run = _flops(lambda: kept[-1][0](*kept[-1][1]))[1] if kept else 0
        later = sum(c.runs_by_step[1:])
        misses = c.misses[since[0]:]
        got.update(hits_by_step=list(c.hits_by_step), runs_by_step=list(c.runs_by_step), misses=[m.why for m in misses],
                   miss_steps=[m.step for m in misses], branches=c.branches, branch_inputs=list(c.branch_inputs),
                   generations=c.generations - since[1], exchanges=c.exchanges, report=str(streams[-1]),
                   flops_ratio=(later * per_run / (steps - 1)) / (ref_tally["flops"] / steps))
    return got


def _job(cases: list[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Run every case on this rank: (case name, "wan" / "flux" / "sampler", options, sampler flags)."""
    os.environ["XDIT_KEEP_GRAPHS"] = "1"
    sys.path.insert(0, EXAMPLES)
    import tiny_cfg_pipelines as tiny

    import xdit_compile
    from xdit_compile.context import current

    results = {}
    sampler: Any = None
    for case, kind, options, flags in cases:
        since = (0, 0)
        if kind == "sampler" and sampler is not None:
            # The same compiled sampler model again: a new generation of the same call stream.
            streams = [r.calls for r in xdit_compile.reports() if r.calls is not None]
            since = (len(streams[-1].misses), streams[-1].generations) if streams else (0, 0)
        else:
            torch._dynamo.reset()
            xdit_compile.clear_reports()
            current().graphs.clear()
        if kind == "sampler":
            model = tiny.sampler_model()
            tally = _count_calls(model)
            ref = tiny.sampler(model, steps=STEPS, **flags)
            del model.forward  # back to the class's forward for compiling
            if sampler is None:
                sampler = torch.compile(model, backend="xdit", options=dict(options))
            out = tiny.sampler(sampler, steps=STEPS, **flags)
        else:
            pipe = tiny.build(kind)
            tally = _count_calls(pipe.transformer)
            ref = tiny.generate(pipe, kind, steps=STEPS)
            del pipe.transformer.forward
            pipe.transformer = torch.compile(pipe.transformer, backend="xdit", options=dict(options))
            out = tiny.generate(pipe, kind, steps=STEPS)
        results[case] = _outcome(out, ref, tally, STEPS, since)
    return results


CFG2 = {"use_cfg_parallel": True, "inner": "eager"}
CFG2_ULYSSES2 = {"use_cfg_parallel": True, "ulysses_degree": 2, "inner": "eager"}
CFG3 = {"cfg_degree": 3, "inner": "eager"}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_spmd(_job, 2, [("wan", "wan", CFG2, {}), ("flux", "flux", CFG2, {})], timeout=600.0,
                    env={"XDIT_STRICT": "1"})


@pytest.fixture(scope="module")
def four_ranks() -> list[dict[str, Any]]:
    return run_spmd(_job, 4, [("wan", "wan", CFG2_ULYSSES2, {}), ("flux", "flux", CFG2_ULYSSES2, {})],
                    timeout=600.0, env={"XDIT_STRICT": "1"})


@pytest.fixture(scope="module")
def three_ranks() -> list[dict[str, Any]]:
    cases = [("three", "sampler", CFG3, {}),
             ("negative changes", "sampler", CFG3, {"change_negative": True}),
             ("skipped", "sampler", CFG3, {"skip_alternate": True}),
             ("swapped", "sampler", CFG3, {"swap_at": 4})]
    return run_spmd(_job, 3, cases, timeout=600.0, env={"XDIT_STRICT": "1"})


def _exact(results: list[dict[str, Any]], case: str) -> None:
    for rank, r in enumerate(results):
        got = r[case]
        assert not got["fallbacks"], got["fallbacks"]
        assert got["streams"] == 1, f"{case} rank {rank}: no call stream (report: {got})"
        assert got["err"] <= 1e-4 * got["scale"], f"{case} rank {rank}: error {got['err']} (scale {got['scale']})"


def _all_hits(results: list[dict[str, Any]], case: str, branches: int) -> None:
    for rank, r in enumerate(results):
        got = r[case]
        assert got["branches"] == branches and got["generations"] == 1, got["report"]
        assert got["hits_by_step"] == [0] + [branches - 1] * (STEPS - 1), got["report"]
        assert not got["misses"], got["report"]
        # Steps after the first: one run of the per-rank program per rank.
        assert got["runs_by_step"] == [branches] + [1] * (STEPS - 1), got["report"]
        assert got["exchanges"] == STEPS - 1, got["report"]  # one all-gather of the outputs per predicted step


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_cfg2_two_ranks_exact_and_hits(two_ranks: list[dict[str, Any]], name: str) -> None:
    _exact(two_ranks, name)
    _all_hits(two_ranks, name, 2)
    for r in two_ranks:
        assert 0.45 <= r[name]["flops_ratio"] <= 0.55, r[name]["flops_ratio"]


def test_branch_inputs_are_the_prompt_embeddings(two_ranks: list[dict[str, Any]]) -> None:
    wan, flux = two_ranks[0]["wan"], two_ranks[0]["flux"]
    assert len(wan["branch_inputs"]) == 1 and "encoder_hidden_states" in wan["branch_inputs"][0], wan["report"]
    # Flux's text ids of the two branches are equal (zeros): only the two embeddings differ.
    assert len(flux["branch_inputs"]) == 2, flux["report"]
    assert any("pooled" in s for s in flux["branch_inputs"]), flux["report"]


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_cfg2_ulysses2_four_ranks_exact_and_quarter_flops(four_ranks: list[dict[str, Any]], name: str) -> None:
    _exact(four_ranks, name)
    _all_hits(four_ranks, name, 2)
    for r in four_ranks:
        assert 0.2 <= r[name]["flops_ratio"] <= 0.3, r[name]["flops_ratio"]


def test_three_branches_on_three_ranks(three_ranks: list[dict[str, Any]]) -> None:
    _exact(three_ranks, "three")
    _all_hits(three_ranks, "three", 3)
    for r in three_ranks:
        assert 0.3 <= r["three"]["flops_ratio"] <= 0.37, r["three"]["flops_ratio"]


@pytest.mark.parametrize("case,words", [
    ("negative changes", "encoder_hidden_states"),
    ("skipped", "branch"),
    ("swapped", "first call"),
])
def test_misses_are_exact_and_reported(three_ranks: list[dict[str, Any]], case: str, words: str) -> None:
    _exact(three_ranks, case)
    for r in three_ranks:
        got = r[case]
        assert got["generations"] == 1, got["report"]  # the sampler restarting its timesteps: learned anew
        assert got["misses"], got["report"]
        assert any(words in m for m in got["misses"]), got["report"]
    got = three_ranks[0][case]
    if case == "negative changes":
        assert got["miss_steps"] == list(range(1, STEPS)), got["report"]  # every predicted step
    if case == "skipped":
        assert set(got["miss_steps"]) == set(range(1, STEPS, 2)), got["report"]  # the odd steps only
        assert all(got["hits_by_step"][s] == 2 for s in range(2, STEPS, 2)), got["report"]
    if case == "swapped":
        assert min(got["miss_steps"]) == 4 and all(h == 2 for h in got["hits_by_step"][1:4]), got["report"]


# ---------------------------------------------------------------------- in-process checks (no ranks)
def test_same_bits_is_exact() -> None:
    from xdit_compile.branches import same_bits

    x = torch.tensor([0.0, float("nan"), 1.5])
    assert same_bits(x, x.clone())  # equal NaNs match: the same bits give the same output
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # torch.equal would accept these
    assert not same_bits(x, x.double())
    assert not same_bits(x, x[:2])
    assert same_bits(torch.arange(4), torch.arange(4)) and not same_bits(torch.arange(4), torch.arange(1, 5))


def test_snap_sees_in_place_writes() -> None:
    from xdit_compile.branches.calls import Snap

    x = torch.ones(3)
    snap = Snap.of(x)
    assert snap.matches(x) and snap.matches(torch.ones(3))
    x.add_(1)  # written after the call: what it held then is gone, so nothing matches it
    assert not snap.matches(x) and not snap.matches(torch.ones(3))
    with torch.inference_mode():
        y = torch.ones(3)
    kept = Snap.of(y)  # no version counter: a copy is kept instead
    assert kept.value is not y and kept.matches(y) and not kept.matches(torch.zeros(3))


def test_when_branches_come_as_calls_and_options() -> None:
    from xdit_compile import PlanError
    from xdit_compile.branches import splits_calls
    from xdit_compile.plan import ParallelPlan

    plan = ParallelPlan.from_options({"use_cfg_parallel": True, "ulysses_degree": 2}).resolve(4)
    assert splits_calls(plan, 1) and not splits_calls(plan, 2)
    three = ParallelPlan.from_options({"cfg_degree": 3}).resolve(3)
    assert three.cfg == 3 and splits_calls(three, 1) and splits_calls(three, 2) and not splits_calls(three, 3)
    assert splits_calls(ParallelPlan(cfg=2, pp=2).resolve(4), 1)  # each cfg group's pipeline takes a branch
    assert not splits_calls(ParallelPlan(ulysses=2).resolve(2), 1)
    with pytest.raises(PlanError, match="disagree"):
        ParallelPlan.from_options({"use_cfg_parallel": False, "cfg_degree": 2})
    with pytest.raises(PlanError, match="cfg_degree=0"):
        ParallelPlan.from_options({"cfg_degree": 0})


class _Counts(torch.nn.Module):
    """Writes a buffer in place on every call: answering a call from a prediction would skip that."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x * 2


class _WritesInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.view(-1)[:1].mul_(0)  # through views
        return x + 1


class _Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y[:, 0] = 0  # a write into an intermediate is no state
        return y


@pytest.mark.parametrize("module,why", [(_Counts, "writes input"), (_WritesInput, "writes input"), (_Plain, None)])
def test_calls_with_effects_are_never_answered_from_a_prediction(module: type, why: str | None) -> None:
    from xdit_compile.branches import state_writes

    seen: list[str | None] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        seen.append(state_writes(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module(), backend=capture)(torch.randn(1, 4, 3))
    assert len(seen) == 1
    assert (seen[0] is None) if why is None else (seen[0] is not None and why in seen[0]), seen


def _toy(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor]:
    return (x * t + c.sum(),)


def _stream_calls(calls: list[tuple[torch.Tensor, float, torch.Tensor]], stream: Any = None) -> Any:
    """Run ``calls`` (latent, timestep, conditioning) through a one-group ``CallStream`` around a
    toy program, checking every answer; the stream. One group computes every branch itself: no
    process group needed."""
    from xdit_compile.branches.calls import CallsReport, CallStream

    stream = stream or CallStream(_toy, ["x", "t", "c"], [1], 0, None, 1, 0, [0], CallsReport("toy", 1, 0))
    for x, t, c in calls:
        assert torch.equal(stream(x, torch.tensor([t]), c)[0], _toy(x, torch.tensor([t]), c)[0])
    return stream


def test_call_stream_state_machine() -> None:
    x = [torch.randn(2, 3) for _ in range(4)]
    pos, neg = torch.ones(3), torch.zeros(3)
    r = _stream_calls([(x[s], 1.0 - s / 4, c) for s in range(4) for c in (pos, neg)]).report
    assert (r.branches, r.hits_by_step, r.runs_by_step, r.misses) == (2, [0, 1, 1, 1], [2, 2, 2, 2], [])
    # A second generation (the timesteps restart) relearns.
    calls = [(x[s], 1.0 - s / 4, c) for s in range(2) for c in (pos, neg)]
    r = _stream_calls(calls + calls).report
    assert r.generations == 2 and r.hits == 2 and not r.misses
    # A learned input written in place: never answered from what it held before.
    stream = _stream_calls([(x[0], 1.0, pos), (x[0], 1.0, neg), (x[1], 0.5, pos)])
    neg.add_(1)
    stream = _stream_calls([(x[1], 0.5, neg), (x[2], 0.25, pos), (x[2], 0.25, neg)], stream)
    r = stream.report
    assert r.hits == 0 and [m.step for m in r.misses] == [1, 2], r
    assert r.misses[0].why.startswith("input c differs") and "written in place" in r.misses[1].why, r
    # A loop calling with one timestep and latent again and again is no guidance pattern.
    r = _stream_calls([(x[0], 1.0, torch.full((3,), float(i))) for i in range(20)]).report
    assert r.branches == 0 and r.note and "more than 16" in r.note and r.runs == 20
