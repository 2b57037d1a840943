"""The Dynamo backend ``"xdit"`` and its pass lists.

``torch.compile(model, backend="xdit", options={...})`` calls ``xdit_backend`` once per
graph on every rank (SPMD). Passes, in order, run by ``passes/manager.py`` (which times them,
checks what each requires, and skips those ``XDIT_DISABLE_PASSES=name,...`` names, with their
dependents):

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

Then the per-rank graph goes to the inner compiler (inductor by default, or eager). With a cfg
degree on a graph whose batch does not divide into the cfg groups (a pipeline calling the model once
per guidance branch), the batch axis is not lowered and the program runs behind ``branches.CallStream``
(the cfg groups compute a step's branches at once; ``docs/cfg_across_calls.md``); under PipeFusion
each cfg group's pipeline computes its branch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from . import axes as axes_mod
from . import memory
from . import plan as plan_mod
from .cache import build as step_cache
from .runtime.guard import checked
from .axis import Axis
from .branches import splits_calls, state_writes, stream_inputs, wrap_calls
from .context import current
from .errors import PassError, PassOrderError, PlanError
from .facts import graph_facts, mesh_axes
from .gradients import guard_backward, mark_for_autograd, needs_guard, traced_for_autograd, undifferentiable_ops
from .graph import arg, input_label, op_name, shape
from .passes.attention_kernels import attention_kernels
from .passes.canonical_attention import canonical_attention
from .passes.canonical_mha import canonical_mha
from .passes.choose_seeds import choose_seeds
from .passes.lower import lower
from .passes.manager import Pass, PassRun
from .passes.manager import run_passes as run_pass_list
from .passes.propagate import Propagation, WholeGraphFallback
from .passes.recognise import recognise
from .passes.refresh_meta import refresh_meta
from .passes.settle_writes import settle_writes, unsettle
from .pipefusion import pipefusion_backend
from .pipefusion.entry import STAGE_PASSES
from .placements import REPLICATE, Shard
from .plan import ParallelPlan
from .report import AxisReport, PlanReport, graph_break_text, graph_breaks, publish, reports
from .dynamic_values import per_value, value_nodes
from .specialize import per_shape, symbolic_inputs

log = logging.getLogger("xdit_compile")


@dataclass
class AxisPlans:
    """The plan-to-lower hand-off: ``plan:<axis>`` puts that axis's propagation, ``lower:<axis>`` reads it."""

    by_axis: dict[str, Propagation] = field(default_factory=dict)

    def get(self, axis: str) -> Propagation:
        if axis not in self.by_axis:
            raise PassError(f"xdit: no plan for axis {axis!r} (planned: {sorted(self.by_axis) or 'none'}): "
                            f"pass plan:{axis} must run before lower:{axis}")
        return self.by_axis[axis]


@dataclass
class State:
    """What passes share for one graph."""

    plan: ParallelPlan
    example_inputs: Sequence[Any]
    rank: int
    axes: list[Axis]
    report: PlanReport
    forced: dict[str, dict[fx.Node, Any]] = field(default_factory=dict)
    plans: AxisPlans = field(default_factory=AxisPlans)


def run_passes(gm: fx.GraphModule, state: State, passes: Sequence[Pass], also_known: Sequence[Pass] = ()) -> PassRun:
    """Run ``passes`` (``passes/manager.py``), timing each into the report, honouring XDIT_DISABLE_PASSES."""
    return run_pass_list(gm, state, passes, disabled=current().settings.passes_off(),
                         seconds=state.report.pass_seconds, also_known=also_known)


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


def _axis_passes(axis: Axis, refresh: bool = True) -> list[Pass]:
    """plan / lower (/ refresh) of one axis; they hand over through ``State.plans``, not a closure."""

    def plan_pass(gm: fx.GraphModule, state: State) -> bool:
        forced = state.forced.get(axis.name, {})
        # Marks for the other axis pass values through unchanged on this one.
        if axis.spec.choose is not None:
            state.plans.by_axis[axis.name] = axis.spec.choose(gm, axis.n, forced, plan=state.plan)
            return False
        state.plans.by_axis[axis.name] = choose_seeds(gm, axis.n, axis.spec.seeds_batch_dim, graph_facts(gm)[0],
                                                      forced=forced)
        return False

    def lower_pass(gm: fx.GraphModule, state: State) -> bool:
        prop = state.plans.get(axis.name)
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
                axis.spec.empty_hint)
        if axis.spec.after_lower is not None:
            axis.spec.after_lower(gm, prop, axis, state.example_inputs, ar)
        state.report.axes.append(ar)
        return True

    def refresh_pass(gm: fx.GraphModule, state: State) -> bool:
        refresh_meta(gm, state.example_inputs)
        return False

    a = axis.name
    # Planning reads the recognised roles and the annotations when those passes ran, and plans
    # without them when they are disabled: they are not hard requirements.
    passes = [Pass(f"plan:{a}", plan_pass, provides=(f"plan:{a}",)),
              Pass(f"lower:{a}", lower_pass, requires=(f"plan:{a}",), provides=(f"lowered:{a}",)),
              Pass(f"refresh:{a}", refresh_pass, requires=(f"lowered:{a}",), provides=(f"meta:{a}",))]
    return passes if refresh else passes[:2]


def _front_passes(settle: bool) -> list[Pass]:
    """The passes before the axes: canonical forms, recognition, annotations (and settled writes)."""
    passes = [Pass("canonical_attention", _canonical_attention, provides=("canonical",)),
              Pass("canonical_mha", _canonical_mha, provides=("canonical",)),
              Pass("attention_kernels", _attention_kernels, provides=("canonical",)),
              Pass("recognise", _recognise, provides=("recognised",)),
              Pass("annotations", _annotations, provides=("annotations",))]
    if settle:
        passes.append(Pass("settle_writes", _settle_writes, provides=("settled",)))
    return passes


# ---------------------------------------------------------------------- the backend
def _inner(plan: ParallelPlan, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    if plan.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    from .inner_overlap import inductor_patches

    return compile_fx(gm, example_inputs, config_patches=inductor_patches(plan.reorder_comms) or None)


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


@checked  # ranks agree on what they compile first; each call checks its inputs and names timeouts
def xdit_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                 split_values: bool = True, **_: Any) -> Callable:
    """Rewrite a Dynamo graph into this rank's parallel program and compile it.

    ``split_values=False``: do not split a graph with data-dependent sizes at its value nodes
    (``dynamic_values.py``; the split's own static programs are compiled so).
    """
    plan = ParallelPlan.from_options(options)
    if not (dist.is_available() and dist.is_initialized()):
        if any(getattr(plan, a) not in (None, 1) for a in axes_mod.mesh_dim_names()):
            raise PlanError(
                f"xdit plan {plan.describe()} needs a torch.distributed process group: launch with "
                "torchrun and call torch.distributed.init_process_group() before compiling"
            )
        if step_cache.method(plan):  # one process: the cache needs no collective
            report = PlanReport(f"graph {len(reports())}", plan.describe(), 0, 1, len(gm.graph.nodes))
            publish(report)
            return step_cache.build(plan, gm, example_inputs, report, _cached_cut(gm, plan, example_inputs), _inner)
        return _inner(plan, gm, example_inputs)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world > 1 and symbolic_inputs(gm):  # a new shape under dynamic=None: one static program per shape
        return per_shape(gm, example_inputs, plan.resolve(world, *graph_facts(gm)),
                         lambda g, ex: xdit_backend(g, ex, options), _inner)
    batch, heads = graph_facts(gm)
    plan, memory_est = memory.resolve_for_memory(plan, gm, example_inputs, world, batch, heads,
                                                 _planning_copy(plan, example_inputs))
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
    memory.attach(report, memory_est)  # with memory_budget: fits or not (a WARNING), per rank
    report.graph_breaks = graph_breaks()
    if report.graph_breaks and world > 1 and not current().warned_breaks:
        current().warned_breaks = True  # the graph-break WARNING is logged once per context
        log.warning("xdit: graph breaks: %s", graph_break_text(report.graph_breaks))
    if world == 1:
        publish(report)
        if step_cache.method(plan):
            return step_cache.build(plan, gm, example_inputs, report, _cached_cut(gm, plan, example_inputs), _inner)
        return _inner(plan, gm, example_inputs)
    if plan.degree("pp") > 1:
        # The batch axis (dp x cfg) first, so each batch group pipelines its own share; then
        # PipeFusion splits the graph into stages and lowers Ulysses inside each stage. With one
        # call per guidance branch, the batch axis is skipped: each cfg group pipelines a branch.
        calls = _calls_inputs(gm, example_inputs, plan, batch, report)
        batch_axes = [a for a in mesh_axes(plan, rank) if not a.spec.inside_stages
                      and (calls is None or a.name != axes_mod.BATCH)]
        original = _copy(gm)
        try:
            run_passes(gm, State(plan, example_inputs, rank, batch_axes, report),
                       [*_front_passes(settle=False), *[p for a in batch_axes for p in _axis_passes(a)]],
                       also_known=STAGE_PASSES)  # PipeFusion runs those next
        except WholeGraphFallback as e:
            gm = original
            report.axes.clear()
            log.warning("xdit: %s; every batch group pipelines the whole batch", e)
        program = _guarded(plan, example_inputs, lambda: pipefusion_backend(gm, example_inputs, plan, report, _inner))
        if calls is None:
            return program
        stream = wrap_calls(program, calls, plan, graph_name)
        report.calls = stream.report
        return stream
    writes = state_writes(gm) if splits_calls(plan, batch) else None
    if writes:
        report.warnings.append(f"the cfg groups cannot take the guidance branches from separate calls: {writes} "
                               "(a call answered from another group's output would skip that); the batch axis "
                               "is planned as usual")
        log.warning("xdit: %s", report.warnings[-1])
    elif splits_calls(plan, batch):
        # One call per guidance branch: the cfg groups take the calls, not the batch (branches/).
        calls = stream_inputs(gm, example_inputs)
        inner = _per_rank(gm, example_inputs, plan, rank, report, skip=(axes_mod.BATCH,))
        stream = wrap_calls(inner, calls, plan, graph_name)
        report.calls = stream.report
        return stream
    return _per_rank(gm, example_inputs, plan, rank, report)


def _planning_copy(plan: ParallelPlan, example_inputs: Sequence[Any]) -> Callable[[fx.GraphModule], tuple]:
    """For ``memory.py``'s tp estimate: a copy of a graph after the front passes, and its forced tp placements."""

    def prepare(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
        g = _copy(gm)
        state = State(plan, example_inputs, 0, [], PlanReport("memory estimate", plan.describe(), 0, 1, 0))
        run_passes(g, state, _front_passes(settle=True))
        return g, state.forced.get("tp", {})

    return prepare


def _calls_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: ParallelPlan, batch: int | None,
                  report: PlanReport) -> tuple[list[str], list[int], int | None] | None:
    """``stream_inputs`` of ``gm`` when the cfg groups take the guidance branches from separate calls
    (``branches.splits_calls``) under PipeFusion, else None (a graph writing state gets a warning)."""
    if not splits_calls(plan, batch):
        return None
    writes = state_writes(gm)
    if writes:
        report.warnings.append(f"the cfg groups cannot take the guidance branches from separate calls: {writes} "
                               "(a call answered from another group's output would skip that); the batch axis "
                               "is planned as usual")
        log.warning("xdit: %s", report.warnings[-1])
        return None
    return stream_inputs(gm, example_inputs)


def _per_rank(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: ParallelPlan, rank: int, report: PlanReport,
              skip: tuple[str, ...] = ()) -> Callable:
    """The passes over ``gm`` for every mesh axis but those in ``skip``, then the inner compiler."""
    mark_for_autograd(gm, example_inputs)  # the lowering adds gradient rules to a graph traced for autograd
    state = State(plan, example_inputs, rank, [a for a in mesh_axes(plan, rank) if a.name not in skip], report)
    passes = _front_passes(settle=True)
    for i, axis in enumerate(state.axes):
        # The next axis reads fresh shapes; eager execution of the last one needs none.
        passes += _axis_passes(axis, refresh=not (i == len(state.axes) - 1 and plan.inner == "eager"))
    passes += [Pass("unsettle_writes", _unsettle, requires=("settled",)), Pass("strip_marks", _strip_marks)]
    cut = _cached_cut(gm, plan, example_inputs) if step_cache.method(plan) else None  # marks survive the lowering
    original = _copy(gm)
    try:
        run_passes(gm, state, passes)
    except WholeGraphFallback as e:
        gm = original
        _strip_marks(gm, state)
        report.fallback = str(e)
        report.axes.clear()
        log.warning("xdit: %s; this graph runs replicated on every rank", e)
    except PassOrderError:
        raise  # a wrong pass list is a bug: never hide it behind a fallback
    except PassError as e:
        if current().settings.is_strict():
            raise
        gm = original
        _strip_marks(gm, state)
        report.fallback = f"internal error, ran replicated: {e}"
        report.axes.clear()
        log.warning("xdit: %s; this graph runs replicated on every rank (set XDIT_STRICT=1 to raise)", e)
    memory.measured(report)
    if isinstance(cut, str):
        step_cache.not_cached(plan, report, cut)
    elif cut is not None:
        # Every rank decides alike; with the cfg groups taking separate calls (``skip``), each group runs
        # its own branch and decides over its own sequence ranks only.
        group = plan_mod.world_group(plan) if not skip else plan_mod.process_groups(plan).get(axes_mod.SEQUENCE)
        program = step_cache.build(plan, gm, example_inputs, report, cut, _inner, group,
                                   lowered=report.fallback is None, across_calls=bool(skip))
        publish(report)
        if current().settings.keeps_graphs():
            current().graphs.append((report, gm, list(example_inputs)))
        return program
    publish(report)
    if current().settings.keeps_graphs():
        current().graphs.append((report, gm, list(example_inputs)))
    if not any(ax.collectives for ax in report.axes):
        return _inner(plan, gm, example_inputs)  # nothing moves between ranks: autograd through it is exact
    return _guarded(plan, example_inputs, lambda: _inner(plan, gm, example_inputs), gm)


def _cached_cut(gm: fx.GraphModule, plan: ParallelPlan, example_inputs: Sequence[Any]) -> Any:
    """The step cache's cut of ``gm`` (stamped on its nodes), or why it has none (``cache/``)."""
    if needs_guard(example_inputs):
        return ("traced for autograd (an input requires grad): step caching is for inference; call the model "
                "under torch.no_grad()")
    return step_cache.mark(gm, plan)


def compiled_graphs() -> list[tuple[PlanReport, fx.GraphModule, list[Any]]]:
    """(report, per-rank graph, example inputs) of each graph compiled in this context, kept only with
    ``XDIT_KEEP_GRAPHS=1`` (``context.Settings.keep_graphs``): tests and benchmarks measure them."""
    return list(current().graphs)


def clear_graphs() -> None:
    current().graphs.clear()


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    import copy

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(gm.meta)
    return new
