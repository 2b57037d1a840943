"""Tensor parallel: the ``tp`` mesh dimension and logical axis, seeded on parameters.

Registered here, at import (``xdit_compile/__init__.py`` imports this module), through the axis
registry (``axes.register_mesh_dim`` / ``register_axis``)::

    dp -> cfg -> pp -> ring -> ulysses -> tp        (mesh order, outermost first)
    batch -> sp -> tp                               (the order the axes are planned and lowered)

``tp`` is the innermost mesh dimension: it moves the most often (two blocking all-reduces of the
activations per block, against Ulysses' four all-to-alls of a quarter of them per attention), so
its ranks should be neighbours (the same node, NVLink). It is lowered after ``sp``: by then the
activations are token shards and ``tp`` splits the features of those shards.

The plan search (``choose_tp``) seeds **weights**, never user inputs:

* column parallel: a linear's weight split on its out-features, ``W: S(0)`` (bias ``S(0)``), in
  graph order, when that adds no gather and no more all-reduces than the row-parallel linears
  it brings (Megatron's price; so the modulation linears, whose split outputs would spread over
  the residual stream, stay whole);
  the split is re-segmented where the graph chunks the output (fused projections: GEGLU,
  q/k/v in one linear), as ``choose_seeds._refine_at_cuts`` does for inputs;
* row parallel, derived: a linear whose input arrives split on its features gets its weight
  split on its in-features to match (``W: S(1)``), and the linear rule gives a partial sum
  (``P``, bias added by rank 0), reduced where a rule needs it whole (one all-reduce);
* attention: q/k/v projections split by heads give head-split attention that runs locally
  (``rules/attention.py``), and the output projection is row parallel.

Everything else (norms, modulation, RoPE, residuals) follows the existing rules.

After lowering (``split_weights``), each rank keeps only its slices of the split weights: the
slices become constants of the graph, and the storage of the whole parameters is freed (as
PipeFusion frees other stages' weights; ``pipefusion.configure(free_unused_parameters=False)``
keeps them). The report gives per-rank parameter bytes kept.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from . import annotate as _annotate  # noqa: F401  (defines torch.ops.xdit.mark)
from . import axes
from .context import current
from .errors import PlanError
from .graph import input_label, is_user_input, op_name, shape, value
from .placements import REPLICATE, Partial, Placement, Replicate, Shard, pieces, shard
from .passes.choose_seeds import _refine_at_cuts
from .passes.propagate import Propagation, propagate, try_propagate
from .runtime import redistribute as rt

log = logging.getLogger("xdit_compile.tp")

TP = "tp"
ROW_ROUNDS = 8  # rounds of derived row-parallel seeds (each adds the linears fed by the last round)


# ---------------------------------------------------------------------- the plan search
def _weight(node: fx.Node) -> fx.Node | None:
    """The 2-D parameter placeholder a linear reads as its weight (None for an activation weight)."""
    if op_name(node) != "linear" or len(node.args) < 2:
        w = node.kwargs.get("weight") if op_name(node) == "linear" else None
    else:
        w = node.args[1]
    if not isinstance(w, fx.Node) or w.op != "placeholder" or is_user_input(w) or len(shape(w)) != 2:
        return None
    return w


def _bias(node: fx.Node) -> fx.Node | None:
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(b, fx.Node) and b.op == "placeholder" and not is_user_input(b) and len(shape(b)) == 1:
        return b
    return None


def _moves(prop: Propagation) -> tuple[int, int, int]:
    """(gathers or other reshards, all-reduces, row-parallel weights) of a plan; a value
    redistributed for several users counts once (the lowering shares the copy)."""
    gathers: set[tuple[fx.Node, Any]] = set()
    reduces: set[fx.Node] = set()
    for d in prop.decisions.values():
        for x, want in d.needs.items():
            have = prop.placements.get(x)
            if have == want or isinstance(have, Replicate) or have is None:
                continue
            if isinstance(have, Partial):
                reduces.add(x)
            else:
                gathers.add((x, want))
    # Row-parallel linears, not weights: a weight read by two linears (one MLP applied to text and
    # to image apart) makes two partial sums.
    rows = sum(1 for w, p in prop.seeds.items() if isinstance(p, Shard) and p.dim == 1 and len(shape(w)) == 2
               for u in w.users if op_name(u) == "linear")
    return len(gathers), len(reduces), rows



def _with_rows(gm: fx.GraphModule, n: int, prop: Propagation, forced: Mapping[fx.Node, Placement]) -> Propagation:
    """Add row-parallel seeds: a linear whose input is split on its last dim and whose weight is a
    whole parameter gets the weight split on its in-features, exactly as the input is."""
    for _ in range(ROW_ROUNDS):
        added: dict[fx.Node, Placement] = {}
        for node in gm.graph.nodes:
            w = _weight(node)
            if w is None or w in prop.seeds or w in added or not node.args:
                continue
            x = node.args[0]
            p = prop.placements.get(x)
            if not isinstance(p, Shard) or p.dim != len(shape(x)) - 1 or p.length != shape(w)[1]:
                continue
            if any(op_name(u) != "linear" or _weight(u) is not w for u in w.users):
                continue  # a weight read elsewhere too (tied): leave it whole
            added[w] = p.with_dim(1)
        if not added:
            return prop
        nxt = try_propagate(gm, n, {**prop.seeds, **added}, forced)
        if nxt is None:
            return prop
        prop = nxt
    return prop


def _heads_of(node: fx.Node) -> int | None:
    """Heads a linear's output is viewed as (``[..., H*D] -> [..., H, D]``), if it is."""
    features = shape(node)[-1]
    for u in node.users:
        if op_name(u) in ("view", "reshape", "unflatten") and isinstance(value(u), torch.Tensor):
            s = shape(u)
            if len(s) >= 2 and isinstance(s[-1], int) and isinstance(s[-2], int) and s[-1] * s[-2] == features \
                    and s[-2] > 1:
                return int(s[-2])
    return None


def _sliced_params(gm: fx.GraphModule, n: int, prop: Propagation, forced: Mapping[fx.Node, Placement]) -> Propagation:
    """Seed the parameters that every reader asks for in one shard (norm weights of split
    features, biases): sliced at compile time like the weights, instead of at run time."""
    wanted: dict[fx.Node, set] = {}
    for d in prop.decisions.values():
        for x, want in d.needs.items():
            if x.op == "placeholder" and not is_user_input(x) and x not in prop.seeds:
                wanted.setdefault(x, set()).add(want)
    added = {x: next(iter(w)) for x, w in wanted.items()
             if len(w) == 1 and isinstance(next(iter(w)), Shard) and all(u in prop.decisions for u in x.users)
             and all(x in prop.decisions[u].needs for u in x.users)}
    if not added:
        return prop
    return try_propagate(gm, n, {**prop.seeds, **added}, forced) or prop


SMALL_OUTPUT = 1 / 16  # a linear output at most this share of the largest activation is "small"


def _largest(gm: fx.GraphModule) -> int:
    return max((value(n).numel() for n in gm.graph.nodes
                if isinstance(value(n), torch.Tensor) and value(n).is_floating_point()), default=1)


def _mark_whole(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """An ``xdit::mark`` replicate annotation on ``node`` for the tp axis (``strip_marks`` drops it)."""
    with gm.graph.inserting_after(node):
        m = gm.graph.call_function(torch.ops.xdit.mark.default, (node, TP, -1))
    node.replace_all_uses_with(m, delete_user_cb=lambda u: u is not m)
    for key in ("val", "example_value"):
        if key in node.meta:
            m.meta[key] = node.meta[key]
    return m


def _unmark(gm: fx.GraphModule, m: fx.Node) -> None:
    m.replace_all_uses_with(m.args[0])
    gm.graph.erase_node(m)


def choose_tp(gm: fx.GraphModule, n: int, forced: Mapping[fx.Node, Placement] | None = None,
              plan: Any = None) -> Propagation:
    """The tensor-parallel plan of ``gm`` on ``n`` ranks (see the module docstring).

    Reads ``node.meta["val"]`` (shapes) and whether placeholders are parameters
    (``graph.is_user_input``); writes nothing. The linears it leaves whole, and why, are
    recorded in ``Propagation.fallbacks`` (the report's replicated list). With
    ``plan.tp_sequence_shard``, the partial sums are then reduce-scattered into token shards
    where token-local ops follow (``tp_sequence.py``).
    """
    forced = dict(forced or {})
    best = propagate(gm, n, {}, forced)
    largest = _largest(gm)
    skipped: list[tuple[fx.Node, str]] = []
    for node in list(gm.graph.nodes):
        w = _weight(node)
        if w is None or w in best.seeds or not node.args:
            continue
        if isinstance(best.placements.get(node.args[0]), Shard):
            continue  # fed a split input: a row-parallel candidate, derived below (a P input is reduced first)
        if any(op_name(u) != "linear" or _weight(u) is not w for u in w.users):
            skipped.append((node, f"weight {input_label(w)} is also read outside this linear (tied): kept whole"))
            continue
        out_features = shape(w)[0]
        if out_features < n:
            continue
        seeds = {**best.seeds, w: shard(0, out_features)}
        b = _bias(node)
        if b is not None and all(op_name(u) == "linear" for u in b.users):
            seeds[b] = shard(0, out_features)
        # First as Megatron: the split output flows on to row-parallel linears. Else, for a small
        # output (adaLN modulation of [B, 6D], no token dim): gathered whole right away, a few
        # bytes, where its shards would spread into the residual stream.
        (g0, r0, rows0) = _moves(best)
        small = value(node).numel() <= SMALL_OUTPUT * largest
        accepted = None
        for whole in ((False, True) if small else (False,)):
            mark = _mark_whole(gm, node) if whole else None
            here = {**forced, mark: REPLICATE} if mark is not None else forced
            trial = try_propagate(gm, n, seeds, here)
            if trial is not None:
                trial = _with_rows(gm, n, trial, here)
                trial = _refine_at_cuts(gm, n, trial, here)
                g1, r1, rows1 = _moves(trial)
                # Megatron's price: one all-reduce per row-parallel linear (and the small gather).
                if g1 <= g0 + whole and r1 - r0 <= max(rows1 - rows0, 0):
                    accepted = (trial, here)
                    break
                why = f"would add {g1 - g0} gather(s) and {r1 - r0} all-reduce(s)"
            else:
                why = "would change the graph's meaning (refused by the propagation)"
            if mark is not None:
                _unmark(gm, mark)
        if accepted is None:
            heads = _heads_of(node)
            if heads is not None and heads % n:
                hint = (f"its {heads} heads do not split over {n} ranks: use a tensor_parallel_degree that "
                        f"divides {heads}, or combine a smaller one with ulysses_degree / ring_degree")
            else:
                hint = ("a layer whose features the degree does not divide, or one whose output spreads over "
                        "the residual stream")
            skipped.append((node, f"column-parallel {input_label(w)} {why}: kept whole ({hint})"))
            continue
        trial, here = accepted
        best = trial
        forced = here
    best = _sliced_params(gm, n, best, forced)
    if getattr(plan, "tp_sequence_shard", False):
        from .tp_sequence import sequence_shard

        best = sequence_shard(gm, n, best, forced)
    if not best.seeds:
        best.fallbacks.extend(skipped)
    else:
        best.fallbacks.extend((node, why) for node, why in skipped if _weight(node) not in best.seeds)
    return best


# ---------------------------------------------------------------------- weights split at compile time
# Per parameter (weakly, by id: comparing tensors would read freed storage): its slices already
# cut, by (dim, ranges), in ``Context.tp_slices``. A later compile (a new shape, another graph
# reading the same weight) finds them after the whole tensor's storage was freed.
def kept_slices(x: torch.Tensor) -> list[torch.Tensor]:
    """This rank's slices of parameter ``x`` that compiled graphs hold (none if it is not split)."""
    entry = current().tp_slices.get(id(x))
    return list(entry[1].values()) if entry is not None and entry[0]() is x else []


def _slice_of(x: torch.Tensor, dim: int, ranges: Sequence[tuple[int, int]], label: str) -> torch.Tensor:
    key = (dim, tuple(tuple(r) for r in ranges))
    slices = current().tp_slices
    entry = slices.get(id(x))
    if entry is None or entry[0]() is not x:
        entry = slices[id(x)] = (weakref.ref(x, lambda _r, i=id(x): slices.pop(i, None)), {})
    cut = entry[1]
    if key not in cut:
        if x.numel() and x.untyped_storage().nbytes() == 0:
            raise PlanError(
                f"tensor parallel: parameter {label} was freed by an earlier compile on this rank that split it "
                f"differently (now wanted: dim {dim}, ranges {list(key[1])}, had: {sorted(cut) or 'none'}); call "
                "xdit_compile.pipefusion.configure(free_unused_parameters=False) before the first compile when "
                "the same model is compiled with different plans")
        cut[key] = torch.cat([x.detach().narrow(dim, s, length) for s, length in ranges], dim).clone()
    return cut[key]


def split_weights(gm: fx.GraphModule, prop: Propagation, axis: Any, example_inputs: Sequence[Any],
                  report: Any) -> None:
    """Replace the runtime slices of seeded parameters by this rank's slices, cut now.

    Reads ``prop.seeds`` and the ``shard_slice`` nodes ``lower`` put after them; writes the graph
    (a ``get_attr`` constant per slice) and frees the whole parameters' storage (unless
    ``free_unused_parameters`` is off). Graphs traced for autograd keep the runtime slices (the
    gradients of the whole parameters flow through them). Adds a note with per-rank bytes.
    """
    from .gradients import traced_for_autograd

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(phs)}
    kept = total = 0
    replaced: list[fx.Node] = []
    traced = traced_for_autograd(gm)
    for i, ph in enumerate(phs):
        x = example_inputs[i] if i < len(example_inputs) else None
        if is_user_input(ph) or not isinstance(x, torch.Tensor):
            continue
        nbytes = x.numel() * x.element_size()
        total += nbytes
        p = prop.seeds.get(ph)
        if not isinstance(p, Shard):
            kept += nbytes
            continue
        slices = [u for u in ph.users if u.target is rt.shard_slice]
        if traced or len(slices) != len(ph.users) or not slices:
            kept += nbytes
            continue
        for j, u in enumerate(slices):
            dim, ranges = u.args[1], u.args[2]
            local = _slice_of(x, dim, ranges, input_label(ph))
            name = f"_xdit_tp_{ph.name}_{j}"
            gm.register_buffer(name, local)
            if isinstance(getattr(gm, "_param_name_to_source", None), dict):
                # aot_autograd (inductor) wants a Dynamo source for every lifted constant.
                from torch._dynamo.source import ConstantSource

                gm._param_name_to_source[name] = ConstantSource(name)
            with gm.graph.inserting_before(u):
                const = gm.graph.get_attr(name)
            const.meta.update(u.meta)
            u.replace_all_uses_with(const)
            gm.graph.erase_node(u)
        kept += sum(length for _, length in pieces(p, axis.n, axis.rank)) * nbytes // max(p.length, 1)
        replaced.append(ph)
    if replaced and current().settings.free_unused_parameters:
        for ph in replaced:
            x = example_inputs[index[ph]]
            if x.untyped_storage().nbytes():
                x.untyped_storage().resize_(0)
    gm.graph.lint()
    gm.recompile()
    report.param_bytes = (kept, total)
    note = (f"tensor parallel: {len(replaced)} weight(s) split at compile time; parameters kept on this rank "
            f"{kept / 2**20:.2f} MiB of {total / 2**20:.2f} MiB ({kept / max(total, 1):.2f}x)")
    if traced:
        note += " (traced for autograd: weights sliced at run time, whole parameters kept)"
    report.note = f"{report.note}; {note}" if getattr(report, "note", None) else note


def _register() -> None:
    if TP in axes.mesh_dim_names():
        return
    axes.register_mesh_dim(axes.MeshDim(TP, "tensor_parallel_degree",
                                        "splits the weights (Megatron: column- then row-parallel linears, heads)"))
    axes.register_axis(axes.AxisSpec(
        TP, (TP,), seeds_batch_dim=False, strategies=None, inside_stages=True,
        empty_hint=" (no linear whose weight the degree divides: see the replicated layers below)",
        choose=choose_tp, after_lower=split_weights))


_register()
