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


def full_program(gm: fx.GraphModule, layers: set[str]) -> fx.GraphModule:
    """``gm`` with the attention of ``layers`` filling K/V buffers (a copy)."""
    g = copy_graph(gm)
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


def token_rows(gm: fx.GraphModule) -> int:
    """Rows of tokens of the largest user input: its sequence (3-D) or largest spatial dim (4-D+)."""
    tokens = token_inputs(gm)
    if not tokens:
        return 0
    s = [d for d in shape(tokens[0]) if isinstance(d, int)]
    return max(s[2:]) if len(s) >= 4 else (s[1] if len(s) >= 2 else 0)


def patch_program(gm: fx.GraphModule, m: int, i: int, batch: int | None,
                  example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, Assembly, set[str], list[str]]:
    """Patch ``i`` of ``m``: (program, output assembly, stale-K/V layers, seeds as text)."""
    rows = token_rows(gm)
    if m > rows:
        raise PlanError(f"num_pipeline_patch={m} is larger than the rows of tokens ({rows}): "
                        f"use num_pipeline_patch <= {rows}")
    g = copy_graph(gm)
    prop = choose_seeds(g, m, False, batch)
    if not prop.seeds:
        raise Unsupported(f"no input can be split into {m} patches")
    seeds = [f"{p.name} {pl}" for p, pl in prop.seeds.items()]
    lower(g, prop, Axis("patch", m, i, PATCH_GROUP))
    graph = g.graph
    layers: set[str] = set()
    for n in list(graph.nodes):
        if n.target is not rt_attention.ring_attention:
            continue
        q, k, v = n.args[:3]
        pk = k.meta.get("xdit", {}).get("patch")
        if not isinstance(pk, Shard):
            raise Unsupported(f"attention {n.name}: keys placed {pk}, not sharded over the tokens")
        flat = [x for start, length in pieces(pk, m, i) for x in (start, length)]
        mask = n.kwargs.get("mask")
        with graph.inserting_before(n):
            if isinstance(mask, fx.Node) and op_name(mask) == "xdit_align_mask":
                mask = graph.call_function(rt.align_mask, (mask.args[0], mask.args[1], None))
            layer = n.meta["xdit"][LAYER]
            new = graph.call_function(kv.STALE, (
                q, k, v, mask, n.kwargs.get("scale"), bool(n.kwargs.get("enable_gqa", False)), layer, flat))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        layers.add(layer)
    out = next(n for n in graph.nodes if n.op == "output")
    leaves, _ = tree_flatten(out.args[0])
    gathers: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, fx.Node) and op_name(leaf) == "xdit_gather":
            x, dim, _sizes, _group, order = leaf.args
            gathers.append((dim, tuple(tuple(o) for o in order) if order is not None else None))
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
