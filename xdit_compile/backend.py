"""The Dynamo backend ``"xdit"`` and the pass runner.

``torch.compile(model, backend="xdit", options={...})`` calls ``xdit_backend`` once per
graph on every rank (SPMD). Passes, in order (``XDIT_DISABLE_PASSES=name,...`` skips some):

    canonical_attention  rewrite attention spelled as matmul / einsum / baddbmm into SDPA
    canonical_mha    decompose multi_head_attention_forward into linears and SDPA
    attention_kernels  rewrite registered attention kernels (flash-attn, xformers) into SDPA
    recognise        tag attention (self/cross/joint), norms, patch embeddings, RoPE tables
    annotations      read xdit_compile.shard/replicate marks          (forced placements)
    settle_writes    a buffer filled in place gets a fresh node after its last write (shardable)
    plan:<axis>      choose seeds and propagate placements           (per axis: batch, sp)
    lower:<axis>     rewrite into this rank's program for that axis
    refresh:<axis>   recompute fake shapes for the next axis
    unsettle_writes  drop settle_writes' clones again (planning needed them, the program does not)
    strip_marks      drop the annotation nodes

Then the per-rank graph goes to the inner compiler (inductor by default, or eager).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from . import plan as plan_mod
from .runtime.guard import checked
from .axis import Axis
from .errors import PassError, PlanError, XditError
from .facts import graph_facts, mesh_axes
from .gradients import guard_backward, mark_for_autograd, needs_guard, traced_for_autograd, undifferentiable_ops
from .graph import arg, input_label, op_name, shape
from .passes.attention_kernels import attention_kernels
from .passes.canonical_attention import canonical_attention
from .passes.canonical_mha import canonical_mha
from .passes.choose_seeds import choose_seeds
from .passes.lower import lower
from .passes.propagate import WholeGraphFallback
from .passes.recognise import recognise
from .passes.refresh_meta import refresh_meta
from .passes.settle_writes import settle_writes, unsettle
from .pipefusion import pipefusion_backend
from .placements import REPLICATE, Shard
from .plan import ParallelPlan
from .report import AxisReport, PlanReport, graph_break_text, graph_breaks, publish, reports
from .dynamic_values import per_value, value_nodes
from .specialize import per_shape, symbolic_inputs

log = logging.getLogger("xdit_compile")


@dataclass
class State:
    """What passes share for one graph."""

    plan: ParallelPlan
    example_inputs: Sequence[Any]
    rank: int
    axes: list[Axis]
    report: PlanReport
    forced: dict[str, dict[fx.Node, Any]] = field(default_factory=dict)


PassFn = Callable[[fx.GraphModule, State], bool]


def run_passes(gm: fx.GraphModule, state: State, passes: Sequence[tuple[str, PassFn]]) -> None:
    """Run ``passes`` in order; errors name the failing pass and those that ran before it."""
    disabled = {p for p in os.environ.get("XDIT_DISABLE_PASSES", "").split(",") if p}
    known = {n for name, _ in passes for n in (name, name.split(":")[0])}
    if disabled - known:
        log.warning("xdit: XDIT_DISABLE_PASSES names no pass %s; passes: %s",
                    sorted(disabled - known), ", ".join(name for name, _ in passes))
    done: list[str] = []
    skipped: set[str] = set()
    for name, fn in passes:
        if name in disabled or name.split(":")[0] in disabled:
            log.info("xdit: pass %s disabled by XDIT_DISABLE_PASSES", name)
            skipped.add(name)
            continue
        if _requires(name) in skipped:
            log.warning("xdit: pass %s skipped too: it needs pass %s, which XDIT_DISABLE_PASSES disables",
                        name, _requires(name))
            skipped.add(name)
            continue
        start = time.perf_counter()
        try:
            fn(gm, state)
        except (XditError, WholeGraphFallback):
            raise
        except Exception as e:
            raise PassError(f"xdit pass {name!r} failed after passes {done or 'none'}: {type(e).__name__}: {e}") from e
        state.report.pass_seconds[name] = time.perf_counter() - start
        done.append(name)


def random_ops(gm: fx.GraphModule) -> list[str]:
    """Nodes that draw random numbers (train-mode dropout): each rank draws its own, unlike one rank."""
    found = []
    for node in gm.graph.nodes:
        name = op_name(node)
        p = training = None
        if name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"):
            p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
        elif name == "scaled_dot_product_attention":
            p, training = arg(node, 4, "dropout_p", 0.0), True
        if isinstance(p, (int, float)) and p > 0 and training is not False:
            found.append(f"{node.name} ({name}, p={p}) draws random numbers in training mode: ranks draw "
                         "different masks than one rank would; call model.eval() (or set the dropout "
                         "probability to 0) for inference")
    return found


def _requires(name: str) -> str | None:
    """The pass whose result ``name`` reads (lowering needs that axis's plan, refreshing its lowering)."""
    kind, _, axis = name.partition(":")
    dep = {"lower": "plan", "refresh": "lower"}.get(kind)
    return f"{dep}:{axis}" if dep else None


# ---------------------------------------------------------------------- passes
def _annotations(gm: fx.GraphModule, state: State) -> bool:
    for node in gm.graph.nodes:
        if op_name(node) == "mark":
            src, axis, dim = node.args
            p = REPLICATE if dim < 0 else Shard(dim, (shape(src)[dim],), 1)
            state.forced.setdefault(axis, {})[node] = p
    return False


def _canonical_attention(gm: fx.GraphModule, state: State) -> bool:
    found = canonical_attention(gm)
    state.report.recognised.update(found)
    return bool(found)


def _canonical_mha(gm: fx.GraphModule, state: State) -> bool:
    found = canonical_mha(gm)
    state.report.recognised.update(found)
    return any(k.startswith("attention:") for k in found)


def _attention_kernels(gm: fx.GraphModule, state: State) -> bool:
    found = attention_kernels(gm)
    state.report.recognised.update(found)
    return any(k.startswith("attention:") for k in found)


def _recognise(gm: fx.GraphModule, state: State) -> bool:
    state.report.recognised.update(recognise(gm))
    return False


def _settle_writes(gm: fx.GraphModule, state: State) -> bool:
    return bool(settle_writes(gm))


def _unsettle(gm: fx.GraphModule, state: State) -> bool:
    return bool(unsettle(gm))


def _strip_marks(gm: fx.GraphModule, state: State) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if op_name(node) == "mark":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()
    return changed


def _axis_passes(axis: Axis) -> list[tuple[str, PassFn]]:
    holder: dict[str, Any] = {}

    def plan_pass(gm: fx.GraphModule, state: State) -> bool:
        forced = state.forced.get(axis.name, {})
        # Marks for the other axis pass values through unchanged on this one.
        holder["prop"] = choose_seeds(gm, axis.n, axis.name == "batch", graph_facts(gm)[0], forced=forced)
        return False

    def lower_pass(gm: fx.GraphModule, state: State) -> bool:
        prop = holder["prop"]
        lowered = lower(gm, prop, axis)
        ar = AxisReport(axis.name, axis.n)
        ar.seeds = [(input_label(n) if n.op == "placeholder" else f"activation {n.name}", str(p))
                    for n, p in prop.seeds.items()]
        ar.forced = [(input_label(m.args[0]), str(p)) for m, p in state.forced.get(axis.name, {}).items()]
        ar.replicated = [(n.name, str(op_name(n)), why) for n, why in prop.fallbacks]
        ar.attention = lowered.attention
        ar.collectives = lowered.collectives
        refused = any(n.op == "placeholder" for n, _ in prop.fallbacks)
        if not prop.seeds and not state.forced.get(axis.name):
            ar.note = f"nothing to split on the {axis.name} axis: every rank of it computes the same thing" + (
                " (every input split was refused: see the replicated inputs below)" if refused else
                " (batch too small: a pipeline that calls the model once per CFG half gives it"
                " batch 1; see docs/pipelines.md)" if axis.name == "batch" else "")
        state.report.axes.append(ar)
        return True

    def refresh_pass(gm: fx.GraphModule, state: State) -> bool:
        refresh_meta(gm, state.example_inputs)
        return False

    return [(f"plan:{axis.name}", plan_pass), (f"lower:{axis.name}", lower_pass), (f"refresh:{axis.name}", refresh_pass)]


# ---------------------------------------------------------------------- the backend
def _inner(plan: ParallelPlan, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    if plan.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _guarded(plan: ParallelPlan, example_inputs: Sequence[Any], build: Callable[[], Callable],
             gm: fx.GraphModule | None = None) -> Callable:
    """``build()``'s program. Traced for autograd, it keeps its backward when every op the passes
    inserted into ``gm`` has a gradient rule; else (``gm`` None: PipeFusion) it is built for
    inference and its backward raises ``GradientError`` naming those ops."""
    if not needs_guard(example_inputs):
        return build()
    if gm is None:
        why = ("PipeFusion's stage transfers and stale K/V have no gradient rules" if plan.degree("pp") > 1
               else "its inserted ops have no gradient rules")
    elif not traced_for_autograd(gm):
        why = "it was lowered without its gradient rules (an internal inconsistency: please report it)"
    else:
        missing = undifferentiable_ops(gm)
        if not missing:
            return build()  # with grad mode on: autograd (or aot_autograd) records the program
        why = (f"its ops {', '.join(missing)} (halo exchange / global statistics of sharded convolutions "
               "and group norms, or other runtime functions) have no gradient rules")
    with torch.no_grad():
        return guard_backward(build(), plan.describe(), why)


_WARNED_BREAKS: list[bool] = []  # the graph-break WARNING is logged once per process


@checked  # ranks agree on what they compile first; each call checks its inputs and names timeouts
def xdit_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                 split_values: bool = True, **_: Any) -> Callable:
    """Rewrite a Dynamo graph into this rank's parallel program and compile it.

    ``split_values=False``: do not split a graph with data-dependent sizes at its value nodes
    (``dynamic_values.py``; the split's own static programs are compiled so).
    """
    plan = ParallelPlan.from_options(options)
    if not (dist.is_available() and dist.is_initialized()):
        if any(getattr(plan, a) not in (None, 1) for a in plan_mod.MESH_AXES):
            raise PlanError(
                f"xdit plan {plan.describe()} needs a torch.distributed process group: launch with "
                "torchrun and call torch.distributed.init_process_group() before compiling"
            )
        return _inner(plan, gm, example_inputs)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world > 1 and symbolic_inputs(gm):  # a new shape under dynamic=None: one static program per shape
        return per_shape(gm, example_inputs, plan.resolve(world, *graph_facts(gm)),
                         lambda g, ex: xdit_backend(g, ex, options), _inner)
    batch, heads = graph_facts(gm)
    plan = plan.resolve(world, batch, heads)
    graph_name = f"graph {len(reports())}"
    if world > 1 and split_values and value_nodes(gm):  # nonzero / item captured: one static program per value
        split = per_value(gm, example_inputs, lambda g, ex: xdit_backend.__wrapped__(g, ex, options, split_values=False),
                          check=not plan.check_inputs, name=graph_name)
        if split is not None:
            return split
    report = PlanReport(graph_name, plan.describe(), rank, world, len(gm.graph.nodes))
    report.warnings = random_ops(gm)
    for w in report.warnings:
        log.warning("xdit: %s", w)
    report.graph_breaks = graph_breaks()
    if report.graph_breaks and world > 1 and not _WARNED_BREAKS:
        _WARNED_BREAKS.append(True)
        log.warning("xdit: graph breaks: %s", graph_break_text(report.graph_breaks))
    if world == 1:
        publish(report)
        return _inner(plan, gm, example_inputs)
    if plan.degree("pp") > 1:
        # The batch axis (dp x cfg) first, so each batch group pipelines its own share; then
        # PipeFusion splits the graph into stages and lowers Ulysses inside each stage.
        batch_axes = [a for a in mesh_axes(plan, rank) if a.name == "batch"]
        original = _copy(gm)
        try:
            run_passes(gm, State(plan, example_inputs, rank, batch_axes, report),
                       [("canonical_attention", _canonical_attention), ("canonical_mha", _canonical_mha),
                        ("attention_kernels", _attention_kernels), ("recognise", _recognise),
                        ("annotations", _annotations),
                        *[p for a in batch_axes for p in _axis_passes(a)]])
        except WholeGraphFallback as e:
            gm = original
            report.axes.clear()
            log.warning("xdit: %s; every batch group pipelines the whole batch", e)
        return _guarded(plan, example_inputs, lambda: pipefusion_backend(gm, example_inputs, plan, report, _inner))
    mark_for_autograd(gm, example_inputs)  # the lowering adds gradient rules to a graph traced for autograd
    state = State(plan, example_inputs, rank, mesh_axes(plan, rank), report)
    passes: list[tuple[str, PassFn]] = [("canonical_attention", _canonical_attention), ("canonical_mha", _canonical_mha),
                                        ("attention_kernels", _attention_kernels), ("recognise", _recognise),
                                        ("annotations", _annotations), ("settle_writes", _settle_writes)]
    for i, axis in enumerate(state.axes):
        passes += _axis_passes(axis)
        if i == len(state.axes) - 1 and plan.inner == "eager":
            passes.pop()  # the next axis reads fresh shapes; eager execution needs none
    passes += [("unsettle_writes", _unsettle), ("strip_marks", _strip_marks)]
    original = _copy(gm)
    try:
        run_passes(gm, state, passes)
    except WholeGraphFallback as e:
        gm = original
        _strip_marks(gm, state)
        report.fallback = str(e)
        report.axes.clear()
        log.warning("xdit: %s; this graph runs replicated on every rank", e)
    except PassError as e:
        if os.environ.get("XDIT_STRICT", "0") == "1":
            raise
        gm = original
        _strip_marks(gm, state)
        report.fallback = f"internal error, ran replicated: {e}"
        report.axes.clear()
        log.warning("xdit: %s; this graph runs replicated on every rank (set XDIT_STRICT=1 to raise)", e)
    publish(report)
    if os.environ.get("XDIT_KEEP_GRAPHS", "0") == "1":
        _GRAPHS.append((report, gm, list(example_inputs)))
    if not any(ax.collectives for ax in report.axes):
        return _inner(plan, gm, example_inputs)  # nothing moves between ranks: autograd through it is exact
    return _guarded(plan, example_inputs, lambda: _inner(plan, gm, example_inputs), gm)


# (report, per-rank graph, example inputs) of each compiled graph, kept only when
# XDIT_KEEP_GRAPHS=1 (tests and benchmarks measure the per-rank program directly).
_GRAPHS: list[tuple[PlanReport, fx.GraphModule, list[Any]]] = []


def compiled_graphs() -> list[tuple[PlanReport, fx.GraphModule, list[Any]]]:
    """The per-rank graphs compiled in this process (needs ``XDIT_KEEP_GRAPHS=1``)."""
    return list(_GRAPHS)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    import copy

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(gm.meta)
    return new
