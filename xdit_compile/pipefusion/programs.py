"""The programs a stage runs: the full-sequence program and one program per patch.

Reads: ``node.meta["xdit"]["pf_stage"]`` (kept through the rewrites); writes
``node.meta["xdit"]["pf_layer"]`` (attention layer id, the key of its K/V buffer).

A patch is a shard of the tokens: patch ``i`` of ``M`` is what rank ``i`` of an ``M``-way
sequence split holds, so the per-patch program is the core's sequence lowering on an axis
``patch`` of ``M`` "ranks" with index ``i`` (seeds, propagation, local shapes, sliced
positional tensors: all reused). Two things differ from sequence parallelism:

* attention over sharded K/V, lowered by the core to ring attention on the (fictitious)
  patch group, becomes ``stale_kv_attention`` over the layer's buffer::

      o = ring_attention(q_i, k_i, v_i, group="xdit-pf-patches", kv_sizes=..., mask=m)
   -> o = stale_kv_attention(q_i, k_i, v_i, m', scale, gqa, "hidden_states_4", [start, len, ...])

* the gathers of the outputs are removed and recorded: the driver assembles the patches.

Any other collective on the patch group (an op with no sharding rule in the middle of the
graph needs every patch) makes patches impossible for this graph: ``Unsupported``.
The full program is the graph with those layers' attention replaced by ``fill_kv_attention``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from ..axis import Axis
from ..errors import PlanError
from ..graph import op_name, shape
from ..passes.choose_seeds import choose_seeds
from ..passes.lower import lower
from ..passes.refresh_meta import refresh_meta
from ..placements import Shard, pieces
from ..rules.attention import sdpa_args
from ..runtime import attention as rt_attention
from ..runtime import redistribute as rt
from . import kv
from .cuts import is_attention, token_inputs

PATCH_GROUP = "xdit-pf-patches"
LAYER = "pf_layer"


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

    With ``sp`` (Ulysses inside the stages) the copy is first lowered on that axis (the core's
    seeds, propagation and lowering), and the Ulysses attention of ``layers`` becomes
    ``fill_kv_ulysses_attention``.
    """
    g = copy_graph(gm)
    if sp is not None:
        return _full_sp_program(g, layers, sp, example_inputs)
    for n in list(g.graph.nodes):
        layer = n.meta.get("xdit", {}).get(LAYER)
        if layer not in layers:
            continue
        a = sdpa_args(n)
        with g.graph.inserting_before(n):
            new = g.graph.call_function(kv.FILL, (
                a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("scale"), bool(a.get("enable_gqa", False)), layer))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        g.graph.erase_node(n)
    g.graph.lint()
    g.recompile()
    return g


def _gathered_pieces(pk: Any, n: int, ranks: Sequence[int]) -> list[int]:
    """Flattened (global start, length) of the shards of ``ranks``, concatenated in that order."""
    return [x for r in ranks for start, length in pieces(pk, n, r) for x in (start, length)]


def _full_sp_program(g: fx.GraphModule, layers: set[str], sp: Axis, example_inputs: Sequence[Any]) -> fx.GraphModule:
    from ..backend import graph_facts

    lower(g, choose_seeds(g, sp.n, False, graph_facts(g)[0]), sp)
    for n in list(g.graph.nodes):
        layer = n.meta.get("xdit", {}).get(LAYER)
        if layer not in layers:
            continue
        if n.target is not rt_attention.ulysses_attention:
            raise PlanError(f"attention {layer} is not lowered to Ulysses attention on the {sp.n} sequence ranks "
                            f"inside a stage ({op_name(n)}): choose a ulysses_degree that divides the heads")
        q, k, v = n.args[:3]
        flat = _gathered_pieces(k.meta["xdit"][sp.name], sp.n, range(sp.n))
        kw = n.kwargs
        with g.graph.inserting_before(n):
            new = g.graph.call_function(kv.FILL_ULYSSES, (
                q, k, v, kw.get("mask"), kw.get("scale"), bool(kw.get("enable_gqa", False)), layer, flat,
                kw["group"], list(kw["q_sizes"]), list(kw["kv_sizes"])))
        new.meta.update(n.meta)
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

    With ``sp`` (a Ulysses axis of ``u`` ranks inside the stage), the tokens are split on one
    axis of ``m * u`` "ranks", patch-major: patch ``i`` on this rank is piece ``i * u + r``.
    That is the core's USP layout with the patches as the (fictitious) ring, so attention is
    lowered to ``usp_attention``, which becomes ``stale_kv_ulysses_attention``; the output
    gathers over the patches become gathers of the patch over the Ulysses group.
    """
    u = sp.n if sp is not None else 1
    rows = token_rows(gm)
    if m * u > rows:
        fix = f"num_pipeline_patch <= {rows // u}" if u > 1 else f"num_pipeline_patch <= {rows}"
        raise PlanError(f"num_pipeline_patch={m}{f' x ulysses_degree={u}' if u > 1 else ''} is larger than the rows "
                        f"of tokens ({rows}): use {fix}")
    if sp is None:
        axis = Axis("patch", m, i, PATCH_GROUP)
    else:
        axis = Axis("sp", m * u, i * u + sp.rank, PATCH_GROUP, ulysses=u, ring=m, ulysses_group=sp.group,
                    ring_group=PATCH_GROUP)
    g = copy_graph(gm)
    prop = choose_seeds(g, axis.n, False, batch)
    if not prop.seeds:
        raise Unsupported(f"no input can be split into {m} patches")
    seeds = [f"{p.name} {pl}" for p, pl in prop.seeds.items()]
    lower(g, prop, axis)
    graph = g.graph
    mine = range(i * u, (i + 1) * u)  # this patch's pieces of the (m * u)-way split
    layers: set[str] = set()
    for n in list(graph.nodes):
        if n.target not in (rt_attention.ring_attention, rt_attention.usp_attention):
            continue
        q, k, v = n.args[:3]
        pk = k.meta.get("xdit", {}).get(axis.name)
        if not isinstance(pk, Shard):
            raise Unsupported(f"attention {n.name}: keys placed {pk}, not sharded over the tokens")
        if sp is not None and n.target is not rt_attention.usp_attention:
            raise Unsupported(f"attention {n.name}: its heads do not split over ulysses_degree={u}")
        kw = n.kwargs
        mask = kw.get("mask")
        with graph.inserting_before(n):
            if isinstance(mask, fx.Node) and op_name(mask) == "xdit_align_mask":
                mask = graph.call_function(rt.align_mask, (mask.args[0], mask.args[1], None))  # keys: global order
            layer = n.meta["xdit"][LAYER]
            common = (q, k, v, mask, kw.get("scale"), bool(kw.get("enable_gqa", False)), layer,
                      _gathered_pieces(pk, axis.n, mine))
            if sp is None:
                new = graph.call_function(kv.STALE, common)
            else:
                new = graph.call_function(kv.STALE_ULYSSES, (
                    *common, sp.group, list(kw["q_sizes"][mine.start:mine.stop]),
                    list(kw["kv_sizes"][mine.start:mine.stop])))
        new.meta.update(n.meta)
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
            if sp is not None:  # this patch's pieces, from the Ulysses group, in rank order
                with graph.inserting_before(leaf):
                    x = graph.call_function(rt.gather, (x, dim, list(sizes[mine.start:mine.stop]), sp.group, None))
            out.replace_input_with(leaf, x)
        else:
            gathers.append(None)
    graph.eliminate_dead_code()
    for n in graph.nodes:
        if any(a == PATCH_GROUP for a in (*n.args, *n.kwargs.values())):
            raise Unsupported(f"{n.name} ({op_name(n)}) needs every patch at once (a collective over the tokens)")
    graph.lint()
    g.recompile()
    refresh_meta(g, example_inputs)
    return g, Assembly(tuple(gathers)), layers, seeds
