"""Per-rank memory of a plan: weight bytes kept against activation bytes, a budget, and the tp pick.

``memory_budget`` (an option: bytes as an int, or a string with a unit, ``"20GiB"``, ``"24GB"``)
states what one rank may hold. With it, the backend estimates each graph's per-rank memory
(``estimate``) and the plan report says whether the plan fits::

    memory: fits: parameters 0.47 MiB + activations ~0.20 MiB of 0.70 MiB budget (per rank)

and WARNs when it does not. When the user leaves every degree unset (the automatic plan) and the
plan of ``ParallelPlan.resolve`` does not fit, ``resolve_for_memory`` picks the smallest
tensor-parallel degree that does: tp is taken out of the world size the sequence axis would
otherwise get (the rest is resolved as before: batch first, then Ulysses while the heads divide
by ``tp x ulysses``, then Ring), and the report says why (``tp 2 chosen: whole weights
0.74 MiB + activations ~0.20 MiB > budget 0.70 MiB``). When no degree fits: ``PlanError`` naming
the budget, the best plan's bytes and the fix. Without a budget nothing here runs: the plans
are exactly those of ``resolve``.

What the estimate counts (``MemoryEstimate``):

* parameters: the bytes of every parameter and buffer the graph lifts (non-user placeholders), as
  the largest rank keeps them: under tp, the split ones by this rank's ranges of
  ``tensor_parallel.choose_tp``'s seeds (run on a copy of the graph after the canonical passes,
  so it is the split ``split_weights`` makes later; the report adds the measured figure); under
  PipeFusion, the weights read only inside the transformer blocks divided by the stages
  (``pipefusion``'s ``find_cuts``), the rest whole; else whole.
* activations: the peak of the bytes live at once when the graph runs in node order on one rank
  (user inputs and every op's result from where it is made to its last reader; views and
  getitems share their base's bytes; parameters excluded), divided by the degrees that split
  tokens or batch (dp x cfg where the batch divides, ring x ulysses). Tensor parallel keeps the
  residual stream whole and PipeFusion's patches keep stale K/V, so neither divides it. It is
  an estimate (temporaries inside an op, the inner compiler's buffers and the allocator are not
  counted), shown with a ``~``.

Reads ``node.meta["val"]`` (shapes, dtypes) and the example inputs; writes nothing on ``gm``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.fx as fx

from . import axes
from .bytesize import fmt_bytes, parse_bytes  # noqa: F401  (parse_bytes: the option, re-exported)
from .errors import PlanError
from .graph import is_user_input, op_name, value

if TYPE_CHECKING:
    from .plan import ParallelPlan
    from .report import PlanReport

log = logging.getLogger("xdit_compile")


@dataclass
class MemoryEstimate:
    """One plan's per-rank memory on one graph (bytes; see the module docstring for what counts)."""

    plan: str  # ParallelPlan.describe()
    budget: int | None
    params: int  # parameter bytes the largest rank keeps (estimated)
    params_whole: int  # every parameter whole (one rank)
    activations: int  # peak live activation bytes per rank (estimated)
    chosen: str | None = None  # why the automatic plan took tp, if it did
    measured: int | None = None  # parameter bytes this rank keeps, measured after the split (tp)
    warning: str | None = field(default=None, repr=False)  # the text put into the report's warnings

    @property
    def kept(self) -> int:
        """The parameter bytes the verdict uses: measured where the split was made, else estimated."""
        return self.measured if self.measured is not None else self.params

    @property
    def total(self) -> int:
        return self.kept + self.activations

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def figures(self) -> str:
        measured = "" if self.measured is None or self.measured == self.params else \
            f" (estimated {fmt_bytes(self.params)})"
        return f"parameters {fmt_bytes(self.kept)}{measured} + activations ~{fmt_bytes(self.activations)}"

    def __str__(self) -> str:
        head = f"{self.chosen}; " if self.chosen else ""
        if self.budget is None:
            return f"{head}{self.figures()} per rank"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return f"{head}{verdict}: {self.figures()} of {fmt_bytes(self.budget)} budget (per rank)"


# ---------------------------------------------------------------------- what the estimate counts
def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return math.prod(int(d) if isinstance(d, int) else 64 for d in v.shape) * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    return 0


def parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[tuple[fx.Node, int]]:
    """(placeholder, bytes) of every parameter and buffer the graph lifts."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(ph, x.numel() * x.element_size()) for ph, x in zip(phs, example_inputs)
            if isinstance(x, torch.Tensor) and not is_user_input(ph)]


def peak_activation_bytes(gm: fx.GraphModule) -> int:
    """The most bytes live at once when ``gm`` runs in node order on one rank (module docstring)."""
    from .passes.propagate import _MAY_ALIAS

    nodes = list(gm.graph.nodes)
    base: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if op_name(n) in _MAY_ALIAS and n.args and isinstance(n.args[0], fx.Node):
            base[n] = base.get(n.args[0], n.args[0])
    end: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for x in n.all_input_nodes:
            b = base.get(x, x)
            end[b] = max(end.get(b, i), i)
    frees: dict[int, list[int]] = {}
    live = peak = 0
    for i, n in enumerate(nodes):
        if n not in base and n.op != "output" and (n.op != "placeholder" or is_user_input(n)):
            b = _nbytes(value(n))
            live += b
            peak = max(peak, live)
            frees.setdefault(end.get(n, i), []).append(b)
        live -= sum(frees.pop(i, []))
    return peak


def _activation_divisor(plan: "ParallelPlan", batch: int | None) -> int:
    b = plan.degree(axes.BATCH)
    return (b if batch and batch % b == 0 else 1) * plan.degree(axes.SEQUENCE)


def _kept_under_tp(gm: fx.GraphModule, example_inputs: Sequence[Any], n: int, forced: dict) -> int:
    """Parameter bytes the largest rank keeps under ``choose_tp`` on ``n`` ranks (``gm``: a copy)."""
    from .placements import Shard, pieces
    from .tensor_parallel import choose_tp

    prop = choose_tp(gm, n, forced)
    worst = 0
    for rank in range(n):
        kept = 0
        for ph, nbytes in parameters(gm, example_inputs):
            p = prop.seeds.get(ph)
            if isinstance(p, Shard):
                kept += sum(length for _, length in pieces(p, n, rank)) * nbytes // max(p.length, 1)
            else:
                kept += nbytes
        worst = max(worst, kept)
    return worst


def _kept_under_pp(gm: fx.GraphModule, example_inputs: Sequence[Any], stages: int) -> int:
    """Parameter bytes a PipeFusion stage keeps: the blocks' weights split over the stages, the rest whole."""
    from .pipefusion.cuts import find_cuts
    from .pipefusion.entry import _block_weights

    whole = sum(b for _, b in parameters(gm, example_inputs))
    try:
        blocks = sum(_block_weights(gm, find_cuts(gm), example_inputs).values())
    except Exception as e:  # noqa: BLE001 - no blocks found: PipeFusion itself says why; estimate whole
        log.debug("xdit: memory estimate: no PipeFusion blocks (%s): parameters counted whole", e)
        return whole
    return whole - blocks + math.ceil(blocks / stages)


def copy_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """A copy of ``gm`` to plan on, and the forced tp placements (none): the default ``prepare``."""
    import copy

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(gm.meta)
    return new, {}


class _Planning:
    """What the estimates of one graph share: its peak activations, its parameters, and per tp
    degree the bytes kept (``prepare(gm)`` gives the copy to plan on and the forced tp placements;
    the backend's runs the canonical passes on it first)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 prepare: Callable[[fx.GraphModule], tuple[fx.GraphModule, dict]] = copy_graph) -> None:
        self.source, self.example_inputs, self.prepare = gm, example_inputs, prepare
        self.peak = peak_activation_bytes(gm)
        self.whole = sum(b for _, b in parameters(gm, example_inputs))
        self._tp: dict[int, int] = {}

    def tp_kept(self, n: int) -> int:
        if n not in self._tp:
            g, forced = self.prepare(self.source)
            self._tp[n] = _kept_under_tp(g, self.example_inputs, n, forced)
        return self._tp[n]


def _estimate(plan: "ParallelPlan", planning: _Planning, batch: int | None) -> MemoryEstimate:
    tp, pp = plan.degree("tp") if "tp" in axes.mesh_dim_names() else 1, plan.degree("pp")
    if tp > 1:
        params = planning.tp_kept(tp)
    elif pp > 1:
        params = _kept_under_pp(planning.source, planning.example_inputs, pp)
    else:
        params = planning.whole
    return MemoryEstimate(plan.describe(), plan.memory_budget, params, planning.whole,
                          planning.peak // _activation_divisor(plan, batch))


def estimate(plan: "ParallelPlan", gm: fx.GraphModule, example_inputs: Sequence[Any], batch: int | None = None,
             prepare: Callable[[fx.GraphModule], tuple[fx.GraphModule, dict]] = copy_graph) -> MemoryEstimate:
    """The per-rank memory of resolved ``plan`` on ``gm`` (module docstring); ``gm`` is not changed."""
    return _estimate(plan, _Planning(gm, example_inputs, prepare), batch)


def tp_degrees(world: int, heads: int | None) -> list[int]:
    """Tensor-parallel degrees the automatic plan may take, smallest first: the divisors > 1 of the
    world size that divide the heads (attention splits by heads)."""
    return [t for t in range(2, world + 1) if world % t == 0 and (not heads or heads % t == 0)]


def _with_tp(plan: "ParallelPlan", world: int, batch: int | None, heads: int | None, t: int) -> "ParallelPlan":
    """The automatic plan of ``world // t`` ranks (batch first, then Ulysses while ``heads / t``
    divides, then Ring), with tp ``t`` on the innermost dimension."""
    rest = plan.resolve(world // t, batch, heads // t if heads else None)
    out = replace(rest, tp=t)
    out.validate(world)
    return out


def resolve_for_memory(plan: "ParallelPlan", gm: fx.GraphModule, example_inputs: Sequence[Any], world: int,
                       batch: int | None, heads: int | None,
                       prepare: Callable[[fx.GraphModule], tuple[fx.GraphModule, dict]] = copy_graph,
                       ) -> tuple["ParallelPlan", MemoryEstimate | None]:
    """``plan.resolve(world, batch, heads)`` and its memory estimate; with ``memory_budget`` and every
    degree unset, the smallest tp degree whose plan fits the budget (module docstring).

    Without a budget: exactly ``resolve`` and no estimate. With degrees given, they are kept;
    the report says whether they fit. Raises ``PlanError`` when no automatic plan fits.
    """
    resolved = plan.resolve(world, batch, heads)
    if plan.memory_budget is None:
        return resolved, None
    planning = _Planning(gm, example_inputs, prepare)
    est = _estimate(resolved, planning, batch)
    auto = all(getattr(plan, d) is None for d in axes.mesh_dim_names())
    if est.fits or not auto or "tp" not in axes.mesh_dim_names():
        return resolved, est
    tried = [est]
    for t in tp_degrees(world, heads):
        cand = _with_tp(plan, world, batch, heads, t)
        e = _estimate(cand, planning, batch)
        if e.fits:
            over = f"whole weights {fmt_bytes(est.params)}" + (
                "" if est.params > plan.memory_budget else f" + activations ~{fmt_bytes(est.activations)}")
            e.chosen = (f"tp {t} chosen: {over} > budget {fmt_bytes(plan.memory_budget)} "
                        f"(the automatic plan {est.plan} does not fit)")
            log.info("xdit: %s", e.chosen)
            return cand, e
        tried.append(e)
    best = min(tried, key=lambda x: x.total)
    listing = "; ".join(f"{x.plan}: {fmt_bytes(x.total)}" for x in tried)
    most = max(tp_degrees(world, heads) or [1])
    more = (f"launch more ranks (tensor_parallel_degree can grow to the heads, {heads})" if heads and most < heads
            else "launch more ranks")
    ranks = f"{world} rank" + ("s" if world > 1 else "")
    raise PlanError(
        f"memory_budget {fmt_bytes(plan.memory_budget)} per rank: no automatic plan on {ranks} fits; the best, "
        f"{best.plan}, needs {best.figures()} = {fmt_bytes(best.total)} per rank (tried {listing}). Fix: raise "
        f"memory_budget to at least {fmt_bytes(best.total)}, {more}, or set the degrees yourself (a plan that does "
        "not fit then runs with a WARNING)")


# ---------------------------------------------------------------------- the report
def attach(report: "PlanReport", est: MemoryEstimate | None) -> None:
    """Put ``est`` on the report; a plan that does not fit gets a WARNING (report and log)."""
    if est is None:
        return
    report.memory = est
    _verdict(report, est)


def measured(report: "PlanReport") -> None:
    """After the passes: the parameter bytes this rank keeps as ``split_weights`` measured them
    (the tp axis report's ``param_bytes``) replace the estimate in the verdict."""
    est = getattr(report, "memory", None)
    if est is None:
        return
    if report.fallback is not None:  # the whole graph runs replicated: every parameter whole
        est.measured = est.params_whole
        _verdict(report, est)
        return
    for ar in report.axes:
        got = getattr(ar, "param_bytes", None)
        if got is not None:
            est.measured = got[0]
            _verdict(report, est)


def _verdict(report: "PlanReport", est: MemoryEstimate) -> None:
    """The report's WARNING for ``est`` (replacing an earlier one of it; logged when new)."""
    text = None
    if not est.fits:
        over = est.total - (est.budget or 0)
        fix = ("a larger tensor_parallel_degree (more ranks)" if "tp=" in est.plan else
               "leave the degrees unset for the automatic plan to take tensor_parallel_degree, or set "
               "tensor_parallel_degree (it splits the weights)")
        text = (f"memory: plan {est.plan} does not fit memory_budget {fmt_bytes(est.budget or 0)} per rank: "
                f"{est.figures()} = {fmt_bytes(est.total)} ({fmt_bytes(over)} over); raise memory_budget, or {fix}")
    if text == est.warning:
        return
    if est.warning in report.warnings:
        report.warnings.remove(est.warning)
    est.warning = text
    if text is not None:
        report.warnings.append(text)
        log.warning("xdit: %s", text)
