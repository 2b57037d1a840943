"""The programs a stage runs: the full-sequence program and one program per patch.

Reads: ``node.meta["xdit"]["pf_stage"]`` (kept through the rewrites); writes
``node.meta["xdit"]["pf_layer"]`` (attention layer id, the key of its K/V buffer).

A patch is a shard of the tokens: patch ``i`` of ``M`` is what rank ``i`` of an ``M``-way
sequence split holds, so the per-patch program is the core's sequence lowering on an axis
``patch`` of ``M`` "ranks" with index ``i`` (seeds, propagation, local shapes, sliced
positional tensors: all reused). Two things differ from sequence parallelism:

* attention over sharded K/V, lowered by the core to ring attention on the (fictitious)
  patch group, becomes ``stale_kv_attention`` over the layer's buffer: the registry's
  ``stale_kv`` strategy, fed from the ``AttentionRecord`` the ring strategy left in
  ``node.meta["xdit"]["strategy"]`` (no call is parsed)::

      o = ring_attention(q_i, k_i, v_i, group="xdit-pf-patches", kv_sizes=..., mask=m)
   -> o = stale_kv_attention(q_i, k_i, v_i, m', scale, gqa, "hidden_states_4", [start, len, ...],
                             None, None, q_sizes, kv_sizes)

* the gathers of the outputs are removed and recorded: the driver assembles the patches.

With sequence parallelism inside the stage (``sp``: R ring x U Ulysses ranks), the patch's
tokens are split once more over the sp ranks (see ``patch_program``) and the stale op gets the
real Ulysses and ring groups: it all-to-alls over Ulysses, all-gathers the patch's K/V over the
ring, and attends over the whole-sequence buffer (``kv.py``).

Any other collective on the patch group (an op with no sharding rule in the middle of the
graph needs every patch) makes patches impossible for this graph: ``Unsupported``.
The full program is the graph (lowered on ``sp`` when given) with those layers' attention
replaced by ``fill_kv_attention``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from ..axis import Axis
from ..errors import PassError, PlanError
from ..facts import graph_facts
from ..graph import eliminate_dead_code, op_name, shape
from ..passes.choose_seeds import choose_seeds
from ..passes.lower import lower
from ..passes.refresh_meta import refresh_meta
from ..placements import Shard, pieces
from ..rules.attention import sdpa_args
from ..runtime import redistribute as rt
from ..strategies import AttentionCall, get, record_of
from ..strategies.base import stamp
from . import kv  # noqa: F401  (registers the K/V attention ops the fill / stale strategies emit)
from .cuts import is_attention, token_inputs

PATCH_GROUP = "xdit-pf-patches"
LAYER = "pf_layer"
_FILL, _STALE = get("fill_kv"), get("stale_kv")


class Unsupported(Exception):
    """This graph cannot run in patches (the message says why)."""


@dataclass(frozen=True)
class Assembly:
    """How each flat output leaf of a patch program becomes the full output."""

    gathers: tuple[tuple[int, tuple[tuple[int, int, int], ...] | None] | None, ...]  # (dim, order) or None

    def __call__(self, per_patch: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for j, g in enumerate(self.gathers):
            if g is None:
                out.append(per_patch[-1][j])
                continue
            dim, order = g
            full = torch.cat([p[j] for p in per_patch], dim=dim)
            if order is not None:
                full = torch.cat([full.narrow(dim, off, ln) for off, ln, _ in sorted(order, key=lambda o: o[2])], dim=dim)
            out.append(full)
        return out


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(gm.meta)
    return new


def stamp_layers(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if is_attention(n):
            n.meta.setdefault("xdit", {})[LAYER] = n.name


def full_program(gm: fx.GraphModule, layers: set[str], sp: Axis | None = None,
                 example_inputs: Sequence[Any] = ()) -> fx.GraphModule:
    """``gm`` with the attention of ``layers`` filling K/V buffers (a copy).

    With ``sp`` (sequence parallelism inside the stages) the copy is first lowered on that axis
    (the core's seeds, propagation and lowering), and the Ulysses / ring / USP attention of
    ``layers`` becomes ``fill_kv_attention`` with the same groups.
    """
    g = copy_graph(gm)
    if sp is not None:
        return _full_sp_program(g, layers, sp, example_inputs)
    for n in list(g.graph.nodes):
        layer = n.meta.get("xdit", {}).get(LAYER)
        if layer not in layers:
            continue
        a = sdpa_args(n)
        sq, sk = shape(a["query"])[-2], shape(a["key"])[-2]
        call = AttentionCall(a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("scale"),
                             bool(a.get("enable_gqa", False)))
        with g.graph.inserting_before(n):
            new, rec = _FILL.emit_kv(g.graph, call, layer, [0, sk], None, None, [sq], [sk])
        stamp(new, n, rec)
        n.replace_all_uses_with(new)
        g.graph.erase_node(n)
    g.graph.lint()
    g.recompile()
    return g


def _gathered_pieces(pk: Any, n: int, ranks: Sequence[int]) -> list[int]:
    """Flattened (global start, length) of the shards of ``ranks``, concatenated in that order."""
    return [x for r in ranks for start, length in pieces(pk, n, r) for x in (start, length)]


def sp_groups(sp: Axis) -> tuple[str | None, str | None]:
    """The real (Ulysses group, ring group) of a stage's sp axis; ``None`` for a degree of 1.

    An axis with one kind of degree > 1 may name only its sp group (as ``backend._axes`` does):
    that group is then the Ulysses (or ring) group.
    """
    if sp.ulysses > 1 and sp.ring > 1 and (sp.ulysses_group is None or sp.ring_group is None):
        raise PassError(f"sp axis ring={sp.ring} x ulysses={sp.ulysses} names no Ulysses/ring sub-groups")
    ug = sp.ulysses_group if sp.ring > 1 else sp.group
    rg = sp.ring_group if sp.ulysses > 1 else sp.group
    return (ug if sp.ulysses > 1 else None), (rg if sp.ring > 1 else None)


def _full_sp_program(g: fx.GraphModule, layers: set[str], sp: Axis, example_inputs: Sequence[Any]) -> fx.GraphModule:
    lower(g, choose_seeds(g, sp.n, False, graph_facts(g)[0]), sp)
    for n in list(g.graph.nodes):
        layer = n.meta.get("xdit", {}).get(LAYER)
        if layer not in layers:
            continue
        rec = record_of(n)
        if rec is None or rec.q_sizes is None or rec.kv_sizes is None or not isinstance(rec.kv_placement, Shard):
            how = f"lowered as {rec.strategy}" if rec is not None else f"left as {op_name(n)}"
            raise PlanError(f"attention {layer} is not lowered to sequence-parallel attention over its tokens on the "
                            f"{sp.n} sequence ranks inside a stage ({how}): use use_cfg_parallel or "
                            "data_parallel_degree for those ranks")
        flat = _gathered_pieces(rec.kv_placement, sp.n, range(sp.n))
        with g.graph.inserting_before(n):
            new, fill = _FILL.emit_kv(g.graph, rec.call, layer, flat, rec.ulysses_group, rec.ring_group,
                                      rec.q_sizes, rec.kv_sizes)
        stamp(new, n, fill)
        n.replace_all_uses_with(new)
        g.graph.erase_node(n)
    g.graph.lint()
    g.recompile()
    refresh_meta(g, example_inputs)
    return g


def token_rows(gm: fx.GraphModule) -> int:
    """Rows of tokens of the largest user input: its sequence (3-D) or largest spatial dim (4-D+)."""
    tokens = token_inputs(gm)
    if not tokens:
        return 0
    s = [d for d in shape(tokens[0]) if isinstance(d, int)]
    return max(s[2:]) if len(s) >= 4 else (s[1] if len(s) >= 2 else 0)


def patch_program(gm: fx.GraphModule, m: int, i: int, batch: int | None, example_inputs: Sequence[Any],
                  sp: Axis | None = None) -> tuple[fx.GraphModule, Assembly, set[str], list[str]]:
    """Patch ``i`` of ``m``: (program, output assembly, stale-K/V layers, seeds as text).

    With ``sp`` (R ring x U Ulysses ranks inside the stage, ``n = R * U``), the tokens are
    split on one axis of ``m * n`` "ranks", patch-major: patch ``i`` on sp rank ``r`` is piece
    ``i * n + r``. That is the core's USP layout with ``m * R`` ring ranks (the patches times
    the real ring), so attention is lowered to ``usp_attention`` (U > 1) or ``ring_attention``
    (U == 1, or heads that do not divide U: a ring over all ``m * n`` pieces). Either becomes
    ``stale_kv_attention`` with the real groups: Ulysses inside, and the ring over the real
    ring group (the sp group for ``ring_attention``), which all-gathers the patch's K/V; the
    output gathers over the patches become gathers of the patch over the sp group.
    """
    n_sp = sp.n if sp is not None else 1
    rows = token_rows(gm)
    if m * n_sp > rows:
        degrees = "".join(f" x {d}_degree={getattr(sp, d)}" for d in ("ring", "ulysses")
                          if sp is not None and getattr(sp, d) > 1)
        raise PlanError(f"num_pipeline_patch={m}{degrees} is larger than the rows of tokens ({rows}): "
                        f"use num_pipeline_patch <= {rows // n_sp}")
    if sp is None:
        axis = Axis("patch", m, i, PATCH_GROUP)
    else:
        axis = Axis(sp.name, m * n_sp, i * n_sp + sp.rank, PATCH_GROUP, ulysses=sp.ulysses, ring=m * sp.ring,
                    ulysses_group=sp_groups(sp)[0], ring_group=PATCH_GROUP)
    g = copy_graph(gm)
    prop = choose_seeds(g, axis.n, False, batch)
    if not prop.seeds:
        raise Unsupported(f"no input can be split into {m} patches")
    seeds = [f"{p.name} {pl}" for p, pl in prop.seeds.items()]
    lower(g, prop, axis)
    graph = g.graph
    mine = slice(i * n_sp, (i + 1) * n_sp)  # this patch's pieces of the (m * n)-way split
    layers: set[str] = set()
    for n in list(graph.nodes):
        rec = record_of(n)
        if rec is None or rec.ring_group is None:  # only attention whose K/V cross the patches
            continue
        pk = rec.kv_placement
        if not isinstance(pk, Shard) or rec.kv_sizes is None:
            raise Unsupported(f"attention {n.name}: keys placed {pk}, not sharded over the tokens")
        if rec.q_sizes is None:
            raise Unsupported(f"attention {n.name}: queries not sharded over the tokens")
        if sp is None:
            ug, rg = None, None
        elif rec.ulysses_group is not None:  # USP: the stage's real Ulysses and ring groups
            ug, rg = sp_groups(sp)
        else:  # ring over every sp rank of the stage
            ug, rg = None, sp.group
        mask = rec.call.mask
        with graph.inserting_before(n):
            if rec.mask_source is not None:  # keys in global order: the buffer's
                mask = graph.call_function(rt.align_mask, (rec.mask_source, list(rec.q_index) if rec.q_index is not None else None, None))
            layer = n.meta["xdit"][LAYER]
            call = dataclasses.replace(rec.call, mask=mask)
            new, stale = _STALE.emit_kv(graph, call, layer, _gathered_pieces(pk, axis.n, range(axis.n)[mine]), ug, rg,
                                        rec.q_sizes[mine], rec.kv_sizes[mine])
        stamp(new, n, stale)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        layers.add(layer)
    out = next(n for n in graph.nodes if n.op == "output")
    leaves, _ = tree_flatten(out.args[0])
    gathers: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, fx.Node) and op_name(leaf) == "xdit_gather" and leaf.args[3] == PATCH_GROUP:
            x, dim, sizes, _group, order = leaf.args
            gathers.append((dim, tuple(tuple(o) for o in order) if order is not None else None))
            if sp is not None:  # this patch's pieces, from every sp rank (ring x Ulysses), in sp-rank order
                with graph.inserting_before(leaf):
                    x = graph.call_function(rt.gather, (x, dim, list(sizes[mine]), sp.group, None))
            out.replace_input_with(leaf, x)
        else:
            gathers.append(None)
    eliminate_dead_code(graph)
    for n in graph.nodes:
        if any(a == PATCH_GROUP for a in (*n.args, *n.kwargs.values())):
            raise Unsupported(f"{n.name} ({op_name(n)}) needs every patch at once (a collective over the tokens)")
    graph.lint()
    g.recompile()
    refresh_meta(g, example_inputs)
    return g, Assembly(tuple(gathers)), layers, seeds
