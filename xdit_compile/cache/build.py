"""The backend's two hooks for step caching: mark the cut before lowering, build the cached program after.

    mark(gm, plan)     before the axes are lowered (the graph still has global shapes and Dynamo's
                       module paths): ``cut.find_cache_cut`` stamps each node's part
    build(...)         after lowering: split the per-rank graph into its three parts
                       (``split.py``), compile each with the inner compiler and return a
                       ``runtime.StepCache``; a graph without a usable cut compiles whole, and its
                       report says why (``PlanReport.step_cache``)
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch._guards
import torch.fx as fx

from ..passes.refresh_meta import refresh_meta
from .cut import CacheCut, _step_inputs, find_cache_cut
from .runtime import StepCache, StepCacheReport
from .split import split_parts

log = logging.getLogger("xdit_compile")


def method(plan: Any) -> str | None:
    """"fbcache", "teacache" or None (no step caching) for a plan."""
    return "fbcache" if plan.use_fbcache else "teacache" if plan.use_teacache else None


def options_text(plan: Any) -> str:
    text = f"{method(plan)}, cache_threshold={plan.cache_threshold:g}, cache_first_steps={plan.cache_first_steps}"
    if plan.cache_last_steps:
        text += f", cache_last_steps={plan.cache_last_steps} of cache_num_steps={plan.cache_num_steps}"
    if plan.teacache_coefficients is not None:
        text += f", teacache_coefficients={list(plan.teacache_coefficients)}"
    return text


def mark(gm: fx.GraphModule, plan: Any) -> CacheCut | str:
    """Stamp the cut on ``gm``'s nodes (``node.meta["xdit"]["cache_part"]``); or why there is none."""
    return find_cache_cut(gm, method(plan))


def build(plan: Any, gm: fx.GraphModule, example_inputs: Sequence[Any], report: Any, cut: CacheCut | str,
          inner: Callable[[Any, fx.GraphModule, Sequence[Any]], Callable], group: Any = None,
          lowered: bool = False, across_calls: bool = False) -> Callable:
    """This rank's cached program of ``gm`` (or ``gm`` compiled whole when the cut is unusable).

    ``lowered``: ``gm`` was rewritten per rank (kept for the report; the fake values are refreshed
    in every case, so the parts get local shapes). ``group``: the ranks whose sums make the statistic (None: this rank alone).
    ``across_calls``: the program runs behind ``branches.CallStream`` (one cache per guidance branch).
    """
    why = cut if isinstance(cut, str) else None
    if why is None:
        assert isinstance(cut, CacheCut)
        # Fresh fake values (the local shapes of a lowered graph; and, for the inner compiler, none
        # of Dynamo's symbols: inductor would guard on them in the frame being compiled).
        refresh_meta(gm, example_inputs)
        names = {n.name for n in gm.graph.nodes}
        lost = [n for n in (cut.probe, cut.base, *[v for p in cut.pairs for v in p]) if n is not None and n not in names]
        if lost:
            why = f"the lowering replaced {', '.join(lost)}, which the cache reads"
    if why is None:
        probes = {cut.probe, *([cut.base] if cut.base else []), *[x for _, x in cut.pairs]}
        parts = split_parts(gm, probes)
        ys = {y for y, _ in cut.pairs}
        if set(parts[1].send) != ys:
            why = (f"after lowering, the blocks hand {sorted(parts[1].send)} to the epilogue, not the cached "
                   f"{sorted(ys)}")
    if why is not None:
        not_cached(plan, report, why)
        return inner(plan, gm, example_inputs)
    args = list(example_inputs)
    with torch._guards.tracing(None):  # the frame Dynamo is compiling must not guard on the parts' own shapes
        fns = [inner(plan, p.gm, p.example_inputs(args)) for p in parts]
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    steps = [phs.index(n) for n in _step_inputs(gm)]
    info = StepCacheReport(cut.describe(), options_text(plan))
    report.step_cache = info
    log.info("xdit: %s: %s", report.graph, info)
    return StepCache(parts, fns, cut.method, cut.pairs, cut.probe, cut.base, steps, [p.name for p in phs], info,
                     plan, group, args, across_calls)


def not_cached(plan: Any, report: Any, why: str) -> None:
    """Say in the report (and the log) why this graph is not step-cached."""
    report.step_cache = f"step cache ({options_text(plan)}): NOT CACHED: {why}"
    log.warning("xdit: %s: %s", report.graph, report.step_cache)
