"""``pipefusion_backend``: the core backend hands a graph here when ``pipefusion_parallel_degree > 1``.

    [backend.py: batch axis lowered first] -> cuts (cuts.py) -> balance (policy.py) -> mark stages
    -> programs (programs.py: full, patches; ring x Ulysses lowered inside them) -> split each into stages
    (split.py) -> compile this rank's stage -> PipelineDriver (driver.py)

Each rank keeps the parameters and buffers its stage reads and frees the storage of the
others (``configure(free_unused_parameters=False)`` keeps them: do that when the same
module also runs uncompiled on this rank). ``reports()`` lists what was built.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .. import plan as plan_mod
from ..axes import axis_spec
from ..axis import Axis
from ..context import current
from ..errors import PlanError
from ..facts import graph_facts, mesh_axes
from ..passes.manager import Pass, run_passes
from ..graph import has_symbolic_shape, input_label, is_tensor, is_user_input, op_name, value
from ..plan import ParallelPlan
from ..report import AxisReport, PlanReport, publish
from . import p2p
from .cuts import Cuts, find_cuts
from .driver import OutTensor, PipelineDriver, StageProgram, Topology
from .policy import balance
from .programs import Unsupported, full_program, patch_program, stamp_layers
from .split import mark_stages, split_stages
from .stream import PatchLayout

log = logging.getLogger("xdit_compile")

def configure(*, free_unused_parameters: bool | None = None) -> None:
    """PipeFusion settings of the context (``context.Settings``; apply to graphs compiled afterwards)."""
    if free_unused_parameters is not None:
        current().settings.free_unused_parameters = free_unused_parameters


@dataclass
class PipeFusionReport:
    """What PipeFusion built for one graph on one rank: statistics, and a weak reference to the driver
    (``driver``: None once the compiled program is gone; a report does not keep it and its K/V alive)."""

    rank: int
    stage: int
    stages: int
    patches: int  # patches actually used (1 when the graph cannot run in patches)
    warmup_steps: int
    cuts: str
    stage_costs: list[float]
    boundary_bytes: list[int]  # bytes sent to the next stage per full-sequence call, per stage boundary
    param_bytes: int  # parameters and buffers this rank keeps
    param_bytes_total: int  # all of them (one rank's memory without PipeFusion)
    block_param_bytes: int = 0  # of the weights read only between the first and last attention: this rank's
    block_param_bytes_total: int = 0
    seeds: list[str] = field(default_factory=list)
    stale_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    driver_ref: weakref.ref[PipelineDriver] | None = field(default=None, repr=False, compare=False)

    @property
    def driver(self) -> PipelineDriver | None:
        return self.driver_ref() if self.driver_ref is not None else None

    def __str__(self) -> str:
        lines = [
            f"pipefusion: stage {self.stage}/{self.stages} (rank {self.rank}), {self.patches} patch(es), "
            f"warmup {self.warmup_steps} step(s)",
            f"  cuts: {self.cuts}; stage costs {[f'{c:.3g}' for c in self.stage_costs]}",
            f"  boundary bytes per full call: {self.boundary_bytes}",
            f"  parameters kept: {self.param_bytes} of {self.param_bytes_total} bytes "
            f"({self.param_bytes / max(self.param_bytes_total, 1):.0%}); transformer blocks' weights: "
            f"{self.block_param_bytes} of {self.block_param_bytes_total} bytes",
        ]
        if self.seeds:
            lines.append("  patches split: " + ", ".join(self.seeds))
        if self.stale_layers:
            lines.append(f"  stale K/V attention: {len(self.stale_layers)} layer(s)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def reports() -> list[PipeFusionReport]:
    """PipeFusion reports of the graphs compiled in this context, oldest first."""
    return list(current().pipefusion_reports)


def clear_reports() -> None:
    current().pipefusion_reports.clear()


def _check_plan(plan: ParallelPlan, gm: fx.GraphModule) -> list[str]:
    """Refuse symbolic shapes; drop the annotation marks, returning a note on the ones ignored."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and (has_symbolic_shape(n) or isinstance(value(n), torch.SymInt)):
            raise PlanError(
                f"pipefusion needs static shapes, but input {input_label(n)} of this graph has symbolic sizes "
                f"{tuple(value(n).shape) if is_tensor(n) else value(n)}: compile with torch.compile(..., dynamic=False)")
    ignored = []
    for n in list(gm.graph.nodes):
        if op_name(n) == "mark":
            if axis_spec(n.args[1]).inside_stages:  # marks of the axes lowered before the stages were used
                ignored.append(f"{n.args[0].name} ({n.args[1]})")
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.recompile()
    if not ignored:
        return []
    return [f"annotations ignored under PipeFusion (the patches and the sp split inside the stages are derived "
            f"from the graph): {', '.join(ignored)}"]


def _usable_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Example inputs, with parameters an earlier compile freed replaced by zeros (shapes only matter)."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.numel() and x.untyped_storage().nbytes() == 0:
            x = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        out.append(x)
    return out


def _weight_ids(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> frozenset[int]:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(id(example_inputs[i]) for i, n in enumerate(phs)
                     if isinstance(example_inputs[i], torch.Tensor) and not is_user_input(n))


def _cuts_for(gm: fx.GraphModule, example_inputs: Sequence[Any], unit_costs: list[float], stages: int,
              what: str) -> list[int]:
    """``balance``'s cuts, or those of an earlier graph over the same weights with as many units.

    The unit costs change with the shape (attention grows faster than the rest), so a new shape
    could otherwise move a block to a stage whose rank already freed that block's weights.
    """
    ids = _weight_ids(gm, example_inputs)
    # (stages, units, ids of the weights read, cuts) of earlier graphs: a later graph over the same
    # weights (a new shape, compiled by ``specialize.PerShape``) keeps exactly the weights it kept.
    earlier = current().chosen_cuts
    for s, units, seen, chosen in reversed(earlier):
        if s == stages and units == len(unit_costs) and ids & seen:
            return list(chosen)
    chosen = balance(unit_costs, stages, what)
    earlier.append((stages, len(unit_costs), ids, list(chosen)))
    return chosen


def _check_kept(gm: fx.GraphModule, example_inputs: Sequence[Any], used: set[int]) -> None:
    """Refuse to run a stage that reads weights an earlier compile freed (never read zeros)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    freed = [input_label(phs[i]) for i in sorted(used) if isinstance(example_inputs[i], torch.Tensor)
             and example_inputs[i].numel() and example_inputs[i].untyped_storage().nbytes() == 0]
    if freed:
        raise PlanError(
            f"pipefusion: this rank's stage of graph needs weights that an earlier PipeFusion compile on this "
            f"rank freed ({', '.join(freed[:4])}{' and more' if len(freed) > 4 else ''}): call "
            "xdit_compile.pipefusion.configure(free_unused_parameters=False) before the first compile when "
            "the same model is compiled again (e.g. at a new shape) with different stages")


def _step_inputs(gm: fx.GraphModule) -> list[int]:
    """Flat indices of small user tensor inputs (timestep, guidance): their values name a step."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    users = [(i, n) for i, n in enumerate(phs) if is_tensor(n) and is_user_input(n)]
    if not users:
        return []
    batch = max(users, key=lambda t: value(t[1]).numel())[1]
    b = value(batch).shape[0] if value(batch).dim() else 1
    return [i for i, n in users if value(n).dim() <= 1 and value(n).numel() <= b]


def _free(example_inputs: Sequence[Any], gm: fx.GraphModule, used: set[int]) -> tuple[int, int]:
    """Free the storage of parameters/buffers this rank does not read; (kept, total) bytes."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = [i for i, n in enumerate(phs) if isinstance(example_inputs[i], torch.Tensor) and not is_user_input(n)]
    def storage(x: torch.Tensor) -> int:
        # Storages an earlier compile freed all have address 0: tell them apart by tensor.
        return x.untyped_storage().data_ptr() or -id(x)

    kept_storages = {storage(example_inputs[i]) for i in weights if i in used}
    seen: set[int] = set()
    kept = total = 0
    for i in weights:
        x = example_inputs[i]
        ptr = storage(x)
        nbytes = x.numel() * x.element_size()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += nbytes
        if ptr in kept_storages:
            kept += nbytes
        elif current().settings.free_unused_parameters and x.untyped_storage().nbytes():
            x.untyped_storage().resize_(0)
    return kept, total


def _block_weights(gm: fx.GraphModule, cuts: Any, example_inputs: Sequence[Any]) -> dict[int, int]:
    """{flat index: bytes} of weights read only inside the transformer blocks (``Cuts.blocks``)."""
    pos = {n: i for i, n in enumerate(cuts.nodes)}
    lo, hi = cuts.blocks
    out = {}
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        x = example_inputs[i]
        if is_user_input(n) or not isinstance(x, torch.Tensor) or not n.users:
            continue
        if all(u in pos and lo <= pos[u] <= hi for u in n.users):
            out[i] = x.numel() * x.element_size()
    return out


def _sp_axis(plan: ParallelPlan, rank: int) -> Axis | None:
    """The sequence-parallel axis (ring x Ulysses) that runs inside each stage (None without one).

    The core's own sp axis: sub-groups are named only when both degrees are > 1; with one of
    them, the sp group is that group (``programs.sp_groups``).
    """
    return next((a for a in mesh_axes(plan, rank) if a.spec.inside_stages), None)


@dataclass
class StageContext:
    """What PipeFusion's passes share for one graph (``passes/manager.py`` runs them).

    ``pipefusion:stages`` sets ``cuts`` / ``chosen`` and stamps the stage and layer of each node
    (``node.meta["xdit"]``); ``pipefusion:patches`` sets ``patches`` / ``assembly`` / ``layers`` /
    ``seeds`` (or a note and none: the exact pipeline, M=1); ``pipefusion:full`` sets ``full``.
    """

    gm: fx.GraphModule
    inputs: list[Any]  # example inputs with freed weights as zeros (shapes only matter)
    example_inputs: Sequence[Any]  # as Dynamo handed them: the weights' identities name the model
    sp: Axis | None
    m: int
    stages: int
    cuts: Cuts | None = None
    chosen: list[int] = field(default_factory=list)
    patches: list[fx.GraphModule] = field(default_factory=list)
    assembly: Any = None
    layers: set[str] = field(default_factory=set)
    seeds: list[str] = field(default_factory=list)
    full: fx.GraphModule | None = None
    notes: list[str] = field(default_factory=list)


def _stages_pass(gm: fx.GraphModule, ctx: StageContext) -> bool:
    """Cut the graph into units, balance them over the stages and mark each node's stage."""
    ctx.cuts = find_cuts(gm)
    if ctx.cuts.attention_layers == 0:
        return False
    ctx.chosen = _cuts_for(gm, ctx.example_inputs, ctx.cuts.unit_costs, ctx.stages, ctx.cuts.describe())
    mark_stages(gm, ctx.cuts.nodes, ctx.cuts.positions, ctx.chosen)
    stamp_layers(gm)
    return True


def _patches_pass(gm: fx.GraphModule, ctx: StageContext) -> bool:
    """The ``m`` patch programs with stale K/V attention (none when ``m`` is 1 or patches cannot work)."""
    if ctx.m <= 1 or ctx.cuts is None or not ctx.cuts.attention_layers:
        return False
    batch = graph_facts(gm)[0]
    try:
        for i in range(ctx.m):
            g, ctx.assembly, got, ctx.seeds = patch_program(gm, ctx.m, i, batch, ctx.inputs, ctx.sp)
            ctx.patches.append(g)
            ctx.layers |= got
    except Unsupported as e:
        ctx.notes.append(f"runs without patches (exact pipeline, M=1): {e}")
        ctx.patches, ctx.assembly, ctx.layers = [], None, set()
    if ctx.patches and not ctx.layers:
        ctx.notes.append("no attention over the split tokens: patches need no K/V buffers")
    return False


def _full_pass(gm: fx.GraphModule, ctx: StageContext) -> bool:
    """The full-sequence program, filling the K/V buffers of the patches' stale layers."""
    if ctx.cuts is None or not ctx.cuts.attention_layers:
        return False
    ctx.full = full_program(gm, ctx.layers, ctx.sp, ctx.inputs)
    return False


# Disabling pipefusion:patches runs the exact pipeline (M=1); disabling stages or full runs replicated.
STAGE_PASSES = (
    Pass("pipefusion:stages", _stages_pass, provides=("stages",)),
    Pass("pipefusion:patches", _patches_pass, requires=("stages",), provides=("patches",)),
    Pass("pipefusion:full", _full_pass, requires=("stages",), provides=("full program",)),
)


def pipefusion_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: ParallelPlan,
                       report: PlanReport, inner: Callable[..., Callable]) -> Callable:
    """Compile ``gm`` into this rank's pipeline stage; see the module docstring.

    Axis order (``plan.py``: dp -> cfg -> pp -> ring -> ulysses): the caller has already lowered
    the batch axis (dp x cfg) on ``gm``, so each batch group pipelines its own share of the
    batch; sp (ring x Ulysses) is lowered here, inside every stage program (full and per patch).
    """
    notes = _check_plan(plan, gm)
    world_rank = dist.get_rank()
    stages = plan.degree("pp")
    m = plan.num_pipeline_patch or stages
    if m < 1:
        raise PlanError(f"num_pipeline_patch must be >= 1, got {m}")
    stage = plan.axis_rank("pp", world_rank)
    ranks = next(g for g in plan.axis_groups("pp") if world_rank in g)
    group = plan_mod.process_groups(plan)["pp"]
    p2p.use_pipeline(ranks, plan.timeout_delta)  # transfers wait as long as the plan's groups do
    sp = _sp_axis(plan, world_rank)
    inputs = _usable_inputs(example_inputs)

    ctx = StageContext(gm, inputs, example_inputs, sp, m, stages)
    run = run_passes(gm, ctx, STAGE_PASSES, disabled=current().settings.passes_off(), seconds=report.pass_seconds,
                     also_known=None)  # the backend's batch passes ran first and named unknown passes
    cuts = ctx.cuts
    if ctx.full is None:
        # A graph without transformer blocks (e.g. a piece between graph breaks), or PipeFusion's
        # passes disabled: every rank runs it.
        why = ("no attention in this graph, so no blocks to stage" if cuts is not None and not cuts.attention_layers
               else f"its passes are disabled ({', '.join(sorted(run.skipped))})")
        report.fallback = f"pipefusion: {why}; runs replicated"
        publish(report)
        return inner(plan, gm, example_inputs)
    notes += ctx.notes
    if "pipefusion:patches" in run.skipped and m > 1:
        notes.append("runs without patches (exact pipeline, M=1): pass pipefusion:patches is disabled by "
                     "XDIT_DISABLE_PASSES")
    chosen, full, patch_graphs, assembly, layers, seeds = ctx.chosen, ctx.full, ctx.patches, ctx.assembly, ctx.layers, ctx.seeds
    bounds = [-1, *chosen, len(cuts.unit_costs) - 1]
    stage_costs = [sum(cuts.unit_costs[a + 1:b + 1]) for a, b in zip(bounds, bounds[1:])]

    def build(g: fx.GraphModule) -> StageProgram:
        st = split_stages(g, stages)[stage]
        return StageProgram(st, inner(plan, st.gm, st.example_inputs(inputs)))

    full_prog = build(full)
    patch_splits = [split_stages(g, stages) for g in patch_graphs]
    patch_progs = [StageProgram(parts[stage], inner(plan, parts[stage].gm, parts[stage].example_inputs(inputs)))
                   for parts in patch_splits]
    used = set(full_prog.graph.inputs).union(*[p.graph.inputs for p in patch_progs])
    all_full = split_stages(full, stages)
    blocks = _block_weights(gm, cuts, inputs)
    _check_kept(gm, example_inputs, used)
    kept, total = _free(example_inputs, gm, used)

    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = tree_flatten(out.args[0])
    template = [OutTensor(tuple(value(x).shape), value(x).dtype, value(x).device) if is_tensor(x) else
                (value(x) if isinstance(x, fx.Node) else x) for x in leaves]
    topo = Topology(stage, stages, ranks[stage - 1] if stage > 0 else None,
                    ranks[stage + 1] if stage < stages - 1 else None, ranks[-1], group, tuple(ranks))
    driver = PipelineDriver(topo, full_prog, patch_progs, assembly, (template, spec), _step_inputs(gm),
                            plan.warmup_steps)
    if patch_graphs and assembly is not None:
        driver.layout = PatchLayout.build(patch_graphs, patch_splits, assembly)

    pf = PipeFusionReport(
        rank=world_rank, stage=stage, stages=stages, patches=len(patch_progs) or 1, warmup_steps=plan.warmup_steps,
        cuts=cuts.describe(), stage_costs=stage_costs, boundary_bytes=[p2p.nbytes(s.send) for s in all_full[:-1]],
        param_bytes=kept, param_bytes_total=total, seeds=seeds, stale_layers=sorted(layers), notes=notes,
        driver_ref=weakref.ref(driver))
    pf.block_param_bytes = sum(b for i, b in blocks.items() if i in used)
    pf.block_param_bytes_total = sum(blocks.values())
    current().pipefusion_reports.append(pf)
    ar = AxisReport("pp", stages)
    ar.seeds = [(s, "patch") for s in seeds]
    ar.attention = [(layer, "self/joint", f"stale K/V over {m} patches, warmup {plan.warmup_steps}") for layer in sorted(layers)]
    if stage < stages - 1:
        ar.collectives.append((f"p2p send to rank {topo.next}", "stage boundary", p2p.nbytes(full_prog.graph.send)))
    report.axes.append(ar)
    if sp is not None:
        ar_sp = AxisReport(sp.name, sp.n)
        how = " x ".join(f"{d}={getattr(sp, d)}" for d in ("ring", "ulysses") if getattr(sp, d) > 1)
        ar_sp.attention = [(layer, "self/joint", f"{how} inside the stage; stale K/V buffer of the whole sequence "
                            "(head slice after the Ulysses all-to-all; the patch's K/V all-gathered over the ring)")
                           for layer in sorted(layers)]
        report.axes.append(ar_sp)
    publish(report)
    log.info("%s", pf)
    return driver
