"""Step caching (issue 13): FBCache / TeaCache on the lowered per-rank programs, every rank deciding alike.

One ``run_spmd`` call on 2 ranks (Ulysses 2, inner "eager") runs, for the tiny PixArt-Sigma, SD3 and
Flux pipelines (8 steps, ``examples/tiny_pipelines.py``) and an 8-step loop over the unseen zoo's Wan
(``examples/tiny_dits_more.py``, the model the compiler was not written for): the uncached program,
the cached one at threshold 0, and the cached one at a threshold that skips steps (FBCache; TeaCache on
Flux and Wan). Exact checks: threshold 0 gives the uncached image bit for bit on every rank; the
decisions (computed / skipped per call, and the statistic) are the same on every rank. Measured, not
bounded tightly: the error of the skipping runs against the uncached image (printed with ``-s``). A
second ``run_spmd`` (4 ranks, CFG 2 x Ulysses 2) runs PixArt-Sigma's batched CFG once.

In this process (one rank, no process group): a skipped step runs no FLOPs of the blocks after the
first (the part programs' FLOPs against the eager model's per-block FLOPs), and our decisions and
output match diffusers' own first-block cache hook on the same model and threshold.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import pytest
import torch

import xdit_compile
from xdit_compile.errors import PlanError
from xdit_compile.testing.harness import run_spmd

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
ULYSSES = {"ulysses_degree": 2, "inner": "eager"}
CFG_ULYSSES = {"use_cfg_parallel": True, "ulysses_degree": 2, "inner": "eager"}
STEPS = 8
# Thresholds that skip some (not all) of the 8 steps of these tiny random models (measured: their
# first block's residual changes by 0.05-0.4 per step; the modulated input by ~0.07).
FB = {"pixart": 0.15, "sd3": 0.4, "flux": 0.5, "wan": 0.12}
TEA = {"flux": 0.15, "wan": 0.15}
NAMES = ["pixart", "sd3", "flux", "wan"]
# Real diffusers pipelines calling the transformer once per guidance branch (examples/tiny_cfg_pipelines.py):
# WanPipeline with a negative prompt, FluxPipeline with true CFG. Their skipping thresholds (one rank,
# measured): Wan 0.1 skips steps 1, 2, 6 in both branches; Flux 0.4 skips different steps per branch.
CALL_PIPELINES = {"wan_pipe": "wan", "flux_cfg": "flux"}
FB.update(wan_pipe=0.1, flux_cfg=0.4)
CFG = {"use_cfg_parallel": True, "inner": "eager"}
# (case, model, options) run in the 2-rank spawn besides NAMES under Ulysses 2.
CASES_2 = [("wan_pipe", "wan_pipe", ULYSSES), ("wan_pipe_cfg", "wan_pipe", CFG), ("flux_cfg_cfg", "flux_cfg", CFG)]
# Besides PixArt-Sigma, in the 4-rank spawn (CFG 2 x Ulysses 2): the Wan pipeline across calls, and SD3 (batched
# CFG) and Flux (no CFG: batch 1, one call per step) at threshold 0 only.
CASES_4 = [("wan_pipe_cfg", "wan_pipe", CFG_ULYSSES), ("sd3", "sd3", CFG_ULYSSES, False),
           ("flux", "flux", CFG_ULYSSES, False)]


def _decisions() -> list[list[tuple[int, int, bool, float | None]]]:
    """Per generation, per call: (step, stream, computed, statistic) of every step-cached graph."""
    out = []
    for r in xdit_compile.reports():
        sc = r.step_cache
        if sc is not None and hasattr(sc, "generations"):
            out += [[(d.step, d.stream, d.computed, d.statistic) for d in g.calls] for g in sc.generations]
    return out


def _wan_loop(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """8 Euler steps of a flow-matching-like loop with decreasing timesteps (batch 2)."""
    x = kwargs["hidden_states"].clone()
    with torch.no_grad():
        for i in range(STEPS):
            t = torch.full((x.shape[0],), 999 - 120 * i, dtype=torch.long)
            v = model(**{**kwargs, "hidden_states": x, "timestep": t}, return_dict=False)[0]
            x = x - 0.1 * v
    return x


def _run(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """One generation of ``name`` (compiled with ``options``; None: eager), its image and decisions."""
    sys.path.insert(0, EXAMPLES)
    import tiny_dits_more
    import tiny_pipelines

    torch._dynamo.reset()
    xdit_compile.clear_reports()
    if name in CALL_PIPELINES:  # one transformer call per guidance branch (negative prompt / true CFG)
        import tiny_cfg_pipelines

        pipe = tiny_cfg_pipelines.build(CALL_PIPELINES[name])
        if options is not None:
            pipe.transformer = torch.compile(pipe.transformer, backend="xdit", options=dict(options))
        img = tiny_cfg_pipelines.generate(pipe, CALL_PIPELINES[name], steps=STEPS)
    elif name == "wan":
        model, kwargs = tiny_dits_more.make_more("wan")
        fn = model if options is None else torch.compile(model, backend="xdit", options=dict(options))
        img = _wan_loop(fn, kwargs)
    else:
        pipe = tiny_pipelines.build(name)
        if options is not None:
            pipe.transformer = torch.compile(pipe.transformer, backend="xdit", options=dict(options))
        img = tiny_pipelines.generate(pipe, name, steps=STEPS, progress=False)
    reports = [str(r) for r in xdit_compile.reports()]
    return {"img": img, "decisions": _decisions(), "reports": reports}


def cache_job(names: list[str], base: dict[str, Any], tea: bool = True,
              cases: list[tuple] = ()) -> dict[str, Any]:
    """On every rank: per model, the uncached, threshold-0 and skipping runs (FBCache, TeaCache);
    then each (case, model, options[, skipping]) of ``cases`` the same way (FBCache only; without the
    skipping run when ``skipping`` is False)."""
    out: dict[str, Any] = {}
    for case, name, options, *skipping in [(n, n, base) for n in names] + list(cases):
        runs = {"uncached": _run(name, options),
                "fb0": _run(name, {**options, "use_fbcache": True})}
        if not skipping or skipping[0]:
            runs["fb"] = _run(name, {**options, "use_fbcache": True, "cache_threshold": FB[name]})
        if tea and name in TEA and case == name:
            runs["tea"] = _run(name, {**options, "use_teacache": True, "cache_threshold": TEA[name]})
        out[case] = runs
    return out


_cache: list[dict[str, Any]] = []
_cfg_cache: list[dict[str, Any]] = []


def _results() -> list[dict[str, Any]]:
    if not _cache:
        _cache.extend(run_spmd(cache_job, 2, NAMES, ULYSSES, True, CASES_2, timeout=900,
                               env={"XDIT_STRICT": "1"}))
    return _cache


def _cfg_results() -> list[dict[str, Any]]:
    """PixArt-Sigma (batched CFG) under CFG 2 x Ulysses 2 on 4 ranks: the one 4-rank case."""
    if not _cfg_cache:
        _cfg_cache.extend(run_spmd(cache_job, 4, ["pixart"], CFG_ULYSSES, False, CASES_4, timeout=900,
                                   env={"XDIT_STRICT": "1"}))
    return _cfg_cache


@pytest.mark.parametrize("name", NAMES + [c for c, _, _ in CASES_2])
def test_threshold_zero_equals_uncached_on_every_rank(name: str) -> None:
    for rank, res in enumerate(_results()):
        runs = res[name]
        assert runs["fb0"]["decisions"], f"{name} rank {rank}: not step-cached\n" + "\n".join(runs["fb0"]["reports"])
        assert all(c for gen in runs["fb0"]["decisions"] for _, _, c, _ in gen)
        assert torch.equal(runs["fb0"]["img"], runs["uncached"]["img"]), f"{name} rank {rank}"


@pytest.mark.parametrize("name", NAMES + ["wan_pipe"])
@pytest.mark.parametrize("kind", ["fb", "tea"])
def test_every_rank_skips_the_same_steps(name: str, kind: str) -> None:
    if kind == "tea" and name not in TEA:
        pytest.skip("TeaCache runs on flux and wan only (time)")
    results = _results()
    first = results[0][name][kind]["decisions"]
    calls = [c for gen in first for c in gen]
    skipped = [c for c in calls if not c[2]]
    assert skipped and len(skipped) < len(calls) - 1, f"{name} {kind}: decisions {first}"
    for rank, res in enumerate(results[1:], 1):
        got = res[name][kind]["decisions"]
        assert [[c[:3] for c in g] for g in got] == [[c[:3] for c in g] for g in first], f"{name} {kind} rank {rank}"
        for a, b in zip([c for g in got for c in g], calls):
            assert (a[3] is None) == (b[3] is None) and (a[3] is None or a[3] == pytest.approx(b[3], rel=1e-9))
    ref = results[0][name]["uncached"]["img"]
    err = float((results[0][name][kind]["img"] - ref).abs().max()) / float(ref.abs().max())
    print(f"\n{name} {kind}: skipped {len(skipped)} of {len(calls)} calls, max error vs uncached {err:.3g} of scale")
    assert err < 1.0


def test_cfg_ulysses_four_ranks_decide_alike_and_threshold_zero_is_exact() -> None:
    """Each CFG half lives on its own pair of ranks; the statistic's sums span all four, so the decision
    is the whole batch's: the same as on 2 Ulysses ranks holding both halves."""
    results = _cfg_results()
    first = [d[:3] for g in results[0]["pixart"]["fb"]["decisions"] for d in g]
    assert any(not c for _, _, c in first), first
    for rank, res in enumerate(results):
        runs = res["pixart"]
        assert torch.equal(runs["fb0"]["img"], runs["uncached"]["img"]), f"rank {rank}"
        assert [d[:3] for g in runs["fb"]["decisions"] for d in g] == first, f"rank {rank}"
    assert first == [d[:3] for g in _results()[0]["pixart"]["fb"]["decisions"] for d in g]


_one_rank: dict[str, dict[str, Any]] = {}


def _single(name: str) -> dict[str, Any]:
    """``name``'s uncached and skipping runs in this process (one rank, no process group)."""
    if name not in _one_rank:
        _one_rank[name] = {"uncached": _run(name, {"inner": "eager"}),
                           "fb": _run(name, {"use_fbcache": True, "cache_threshold": FB[name], "inner": "eager"})}
    return _one_rank[name]


@pytest.mark.parametrize("case,name", [("wan_pipe_cfg", "wan_pipe"), ("flux_cfg_cfg", "flux_cfg")])
def test_cfg_across_calls_keeps_a_cache_per_branch(case: str, name: str) -> None:
    """CFG 2 across separate calls (2 ranks, one branch per rank from the second step): each rank caches
    and decides for its own branch, so its decisions are one rank's decisions for that branch (stream),
    and every rank's image is one rank's cached image."""
    one = _single(name)
    single = [d for g in one["fb"]["decisions"] for d in g]
    assert any(not c for _, _, c, _ in single), single
    ref, plain = one["fb"]["img"], one["uncached"]["img"]
    groups = set()
    for rank, res in enumerate(_results()):
        calls = [d for g in res[case]["fb"]["decisions"] for d in g]
        assert [d[:3] for d in calls[:2]] == [(0, 0, True), (0, 1, True)], (rank, calls)  # the learning step
        branch = calls[2][1]  # the branch this rank's group computes from step 1 on
        groups.add(branch)
        mine = [d for d in single if d[1] == branch and d[0] > 0]
        assert [d[:3] for d in calls[2:]] == [d[:3] for d in mine], (rank, calls, single)
        for a, b in zip(calls[2:], mine):
            assert (a[3] is None) == (b[3] is None) and (a[3] is None or a[3] == pytest.approx(b[3], rel=1e-6))
        img = res[case]["fb"]["img"]
        err = float((img - ref).abs().max()) / float(ref.abs().max())
        assert err < 1e-5, f"{case} rank {rank}: {err:.3g} of scale from one rank's cached image"
    assert groups == {0, 1}
    skipped = [(d[0], d[1]) for d in single if not d[2]]
    err = float((ref - plain).abs().max()) / float(plain.abs().max())
    print(f"\n{case}: skipped (step, branch) {skipped} of {len(single)} calls; error vs uncached {err:.3g} of scale")


@pytest.mark.parametrize("case", [c[0] for c in CASES_4])
def test_cfg_ulysses_four_ranks_threshold_zero_is_exact(case: str) -> None:
    for rank, res in enumerate(_cfg_results()):
        runs = res[case]
        assert runs["fb0"]["decisions"], f"{case} rank {rank}: not step-cached\n" + "\n".join(runs["fb0"]["reports"])
        assert torch.equal(runs["fb0"]["img"], runs["uncached"]["img"]), f"{case} rank {rank}"


def test_cfg_ulysses_across_calls_keeps_a_cache_per_branch() -> None:
    """The Wan pipeline (one call per branch) on CFG 2 x Ulysses 2: the two ranks of a cfg group decide
    alike (their sums all-reduced), each group for its own branch, as one rank would for that branch."""
    one = [d for g in _single("wan_pipe")["fb"]["decisions"] for d in g]
    ref = _single("wan_pipe")["fb"]["img"]
    by_branch: dict[int, list] = {}
    for rank, res in enumerate(_cfg_results()):
        calls = [d for g in res["wan_pipe_cfg"]["fb"]["decisions"] for d in g]
        branch = calls[2][1]
        by_branch.setdefault(branch, []).append(calls)
        assert [d[:3] for d in calls[2:]] == [d[:3] for d in one if d[1] == branch and d[0] > 0], (rank, calls, one)
        img = res["wan_pipe_cfg"]["fb"]["img"]
        err = float((img - ref).abs().max()) / float(ref.abs().max())
        print(f"\nwan_pipe CFG 2 x Ulysses 2 rank {rank} (branch {branch}): {err:.3g} of scale from one rank's cached image")
        assert err < 1e-4, (rank, err)
    assert sorted(by_branch) == [0, 1] and all(len(v) == 2 and v[0] == v[1] for v in by_branch.values())


def test_report_names_cut_and_options() -> None:
    text = "\n".join(_results()[0]["pixart"]["fb"]["reports"])
    assert "fbcache: cut after the first block" in text and "cache_threshold=0.15" in text
    assert "generation 0:" in text and "skipped steps" in text


# ---------------------------------------------------------------------- one process
def _wan() -> tuple[torch.nn.Module, dict[str, Any]]:
    sys.path.insert(0, EXAMPLES)
    import tiny_dits_more

    return tiny_dits_more.make_more("wan")


def test_threshold_zero_equals_uncached_on_one_rank() -> None:
    """No process group: the three part programs chained give the uncached program's output bit for bit."""
    for name in NAMES + ["wan_pipe"]:
        plain = _run(name, {"inner": "eager"})
        cached = _run(name, {"use_fbcache": True, "inner": "eager"})
        calls = STEPS * (2 if name in CALL_PIPELINES else 1)
        assert cached["decisions"] and len(cached["decisions"][0]) == calls, (name, cached["reports"])
        assert torch.equal(cached["img"], plain["img"]), name


def test_skipped_step_runs_only_the_first_block() -> None:
    from xdit_compile.testing.parity import _flops

    model, kwargs = _wan()
    counts: list[int] = []
    counter: list[Any] = []

    def pre(*_: Any) -> None:
        counts.append(-counter[0].total)

    def post(*_: Any) -> None:
        counts[-1] += counter[0].total

    from xdit_compile.testing.parity import _CountFlops

    blocks = [b for b in model.blocks]
    hooks = [h for b in blocks[1:] for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    counter.append(_CountFlops())
    with torch.no_grad(), counter[0]:
        model(**kwargs)
    for h in hooks:
        h.remove()
    total, rest = counter[0].total, sum(counts)
    assert rest > 0
    torch._dynamo.reset()
    xdit_compile.clear_reports()
    compiled = torch.compile(model, backend="xdit", options={"use_fbcache": True, "cache_threshold": 0.2,
                                                               "inner": "eager"})
    _wan_loop(compiled, kwargs)
    program = next(r.step_cache for r in xdit_compile.reports() if hasattr(r.step_cache, "generations")).program
    with torch.no_grad():
        parts = [_flops(lambda: program.run_part(k))[1] for k in range(3)]
    assert parts[1] == rest, f"part 1 {parts[1]} FLOPs, blocks 1.. {rest}"
    assert parts[0] + parts[2] == total - rest  # what a skipped step runs
    assert sum(parts) == total


def test_matches_diffusers_first_block_cache() -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    sys.path.insert(0, EXAMPLES)
    from tiny_dits import ZOO

    torch.manual_seed(0)
    model = ZOO["pixart"].build().eval()
    kwargs = ZOO["pixart"].inputs(2, torch.Generator().manual_seed(0))
    theirs = copy.deepcopy(model)
    threshold = 0.15

    def loop(fn: Any, decide: Any = None) -> tuple[torch.Tensor, list[bool]]:
        x, computed = kwargs["hidden_states"].clone(), []
        with torch.no_grad():
            for i in range(STEPS):
                t = torch.full((2,), 999 - 120 * i, dtype=torch.long)
                out = fn(**{**kwargs, "hidden_states": x, "timestep": t}, return_dict=False)[0]
                x = x - 0.1 * out[:, :4]
                if decide is not None:
                    computed.append(decide())
        return x, computed

    torch._dynamo.reset()
    xdit_compile.clear_reports()
    ours, _ = loop(torch.compile(model, backend="xdit", options={"use_fbcache": True, "cache_threshold": threshold,
                                                                   "inner": "eager"}))
    gen = next(r.step_cache for r in xdit_compile.reports() if hasattr(r.step_cache, "generations")).generations
    our_computed = [d.computed for d in gen[0].calls]
    apply_first_block_cache(theirs, FirstBlockCacheConfig(threshold=threshold))
    hook = theirs.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    _set_cache_context(theirs, CacheContext("cond"))  # what CacheMixin.cache_context does (PixArt has none)
    ref, their_computed = loop(theirs, lambda: hook.state_manager.get_state().should_compute)
    assert our_computed == their_computed, (our_computed, their_computed)
    assert 0 < our_computed.count(False) < STEPS - 1, our_computed
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_streams_keep_their_own_cache_and_generations_reset() -> None:
    """CFG across separate calls (cond, then uncond at the same timestep): each branch has its own cache,
    so one compiled model called for both gives what two models, each called for one branch, give; a
    second loop (the timestep going up again) starts a new generation."""
    model, kwargs = _wan()
    other = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"].flip(0)}
    options = {"use_fbcache": True, "cache_threshold": 0.12, "inner": "eager"}

    def loop(cond: Any, uncond: Any) -> torch.Tensor:
        x = kwargs["hidden_states"].clone()
        with torch.no_grad():
            for i in range(STEPS):
                t = torch.full((2,), 999 - 120 * i, dtype=torch.long)
                a = cond(**{**kwargs, "hidden_states": x, "timestep": t}, return_dict=False)[0]
                b = uncond(**{**other, "hidden_states": x, "timestep": t}, return_dict=False)[0]
                x = x - 0.1 * (b + 2.0 * (a - b))
        return x

    torch._dynamo.reset()
    xdit_compile.clear_reports()
    both = torch.compile(model, backend="xdit", options=options)
    one = loop(both, both)
    again = loop(both, both)
    gens = next(r.step_cache for r in xdit_compile.reports() if hasattr(r.step_cache, "generations")).generations
    assert len(gens) == 2 and [(d.step, d.stream) for d in gens[1].calls] == [(i // 2, i % 2) for i in range(16)]
    assert torch.equal(one, again)
    assert any(not d.computed for d in gens[0].calls)
    torch._dynamo.reset()
    cond = torch.compile(copy.deepcopy(model), backend="xdit", options=options)
    uncond = torch.compile(copy.deepcopy(model), backend="xdit", options=options)
    assert torch.equal(one, loop(cond, uncond))


def test_options_are_validated() -> None:
    for bad, words in [({"use_fbcache": 1}, "use_fbcache=1"),
                       ({"use_fbcache": True, "use_teacache": True}, "exclude each other"),
                       ({"use_fbcache": True, "cache_threshold": -1.0}, "cache_threshold=-1.0"),
                       ({"cache_threshold": 0.1}, "without use_fbcache"),
                       ({"use_teacache": True, "cache_last_steps": 2}, "needs cache_num_steps"),
                       ({"use_fbcache": True, "teacache_coefficients": [1.0, 0.0]}, "without use_teacache"),
                       ({"use_fbcache": True, "pipefusion_parallel_degree": 2}, "ulysses_degree, ring_degree")]:
        with pytest.raises(PlanError, match=words.replace("(", r"\(")):
            xdit_compile.ParallelPlan.from_options(bad)
    plan = xdit_compile.ParallelPlan.from_options({"use_teacache": True, "teacache_coefficients": [2.0, 0.0]})
    assert plan.teacache_coefficients == (2.0, 0.0)
