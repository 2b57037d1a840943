"""Seeds on activations: shard a big tensor made inside the graph where no input split reaches it.

A graph that Dynamo cut off after a break, or a model that packs its tokens into a fresh
buffer, can hold most of its work downstream of a tensor that no input seed reaches sharded:

    x: S(1) -> refiner ... -> gather -> buf = new_zeros(B, T+I, D)     (R: made from sizes)
                                      buf[i, :t_i] = txt[i]; buf[i, t_i:] = x[i]  (per-sample offsets)
    h = norm(buf) -> qkv -> sdpa -> mlp ...                           (all R: every rank does it all)

Slicing a replicated tensor is free, so ``buf`` itself can be a seed: each rank keeps its
token chunk right after the last write, and the joint blocks after it run sharded. The seed
search (``choose_seeds``) tries these after the input seeds, by the same cost comparison.

Reads: ``node.meta["val"|"example_value"]`` (global shapes) and a ``Propagation`` (which nodes
are replicated). Writes nothing. A candidate is refused when its storage is written after it
(the lowering's slice is a copy, which would miss the write).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch.fx as fx

from ..graph import has_side_effects, is_tensor, op_name, shape, value, written_inputs
from ..placements import Placement, Replicate, shard
from .propagate import _MAY_ALIAS, Propagation, WholeGraphFallback, _share, estimate_flops, propagate

log = logging.getLogger("xdit_compile.seeds")

# How many activations to try per round (the largest first): each is one propagation.
MAX_CANDIDATES = 8
# Below this share of replicated work, a graph is split well enough: no activation is tried.
MIN_REPLICATED_SHARE = 0.05
# Above this share of replicated work, activation seeds are chosen by the work they split.
SPLIT_SHARE = 0.25


def _alias_roots(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Each node's alias group (a view shares storage with its base; a write with its target)."""
    parent: dict[fx.Node, fx.Node] = {}

    def root(x: fx.Node) -> fx.Node:
        while parent.get(x, x) is not x:
            x = parent.get(x, x)
        return x

    for n in nodes:
        linked = list(written_inputs(n))
        if n.args and isinstance(n.args[0], fx.Node) and op_name(n) in _MAY_ALIAS:
            linked.append(n.args[0])
        for t in linked:
            a, b = root(n), root(t)
            if a is not b:
                parent[a] = b
    return {n: root(n) for n in nodes}


def replicated_share(gm: fx.GraphModule, prop: Propagation, n: int) -> float:
    """Estimated share of the graph's work that every rank repeats under ``prop``."""
    total = repeated = 0.0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        work = estimate_flops(node, op_name(node))
        total += work
        if _share(prop.placements.get(node), n) >= 1.0:
            repeated += work
    return repeated / total if total else 0.0


def activation_candidates(gm: fx.GraphModule, prop: Propagation, n: int, batch_axis: bool,
                          batch: int | None = None) -> list[tuple[fx.Node, Placement]]:
    """(activation, placement) pairs worth trying as seeds, given the plan ``prop`` so far.

    An activation qualifies when it is a replicated tensor of static shape made inside the
    graph, no write to its storage follows it, and it starts a replicated stretch: none of
    its inputs qualifies with at least an eighth of its elements.
    The ``MAX_CANDIDATES`` largest are returned, on the same dims ``choose_seeds.candidates``
    would split an input of that shape.
    """
    nodes = list(gm.graph.nodes)
    pos = {x: i for i, x in enumerate(nodes)}
    roots = _alias_roots(nodes)
    last_write: dict[fx.Node, int] = {}
    for w in nodes:
        for t in written_inputs(w):
            last_write[roots[t]] = max(last_write.get(roots[t], -1), pos[w])
    valid: list[fx.Node] = []
    for node in nodes:
        if node.op not in ("call_function", "call_method") or not is_tensor(node) or has_side_effects(node):
            continue
        s = shape(node)
        if len(s) < 2 or not all(isinstance(d, int) for d in s):
            continue
        if not isinstance(prop.placements.get(node), Replicate):
            continue
        if last_write.get(roots[node], -1) > pos[node]:
            continue  # the slice would be taken before a write into its storage
        valid.append(node)
    chosen = set(valid)
    # Where a replicated stretch begins: no input is itself a candidate of comparable size
    # (a later node of the stretch shards less of it than its start does).
    kept = [x for x in valid
            if not any(y in chosen and 8 * value(y).numel() >= value(x).numel() for y in x.all_input_nodes)]
    kept.sort(key=lambda x: (-value(x).numel(), pos[x]))
    out: list[tuple[fx.Node, Placement]] = []
    for node in kept[:MAX_CANDIDATES]:
        s = shape(node)
        if batch_axis:
            dims = [0] if batch is None or s[0] == batch else []
        else:
            dims = [d for d in range(len(s)) if not (d == 0 and (len(s) >= 3 or s[0] == batch))]
        out.extend((node, shard(d, s[d])) for d in dims if s[d] >= n)
    return out


def add_activation_seeds(gm: fx.GraphModule, n: int, batch_axis: bool, batch: int | None,
                         seeds: dict[fx.Node, Placement], best: Propagation,
                         forced: Mapping[fx.Node, Placement] | None = None) -> Propagation:
    """Greedily add activation seeds to ``seeds`` (in place) while each lowers the plan's cost.

    While a quarter or more of the work is repeated on every rank (``SPLIT_SHARE``), or no seed
    is chosen yet, the seed that splits the most work is taken if it splits at least 5% more
    (the caller asked for this axis, and on small graphs the latency term of the cost would
    keep whole stretches replicated); after that, as for inputs, only a lower estimated cost.
    """
    tried: set[tuple[fx.Node, Placement]] = set()
    while replicated_share(gm, best, n) >= MIN_REPLICATED_SHARE:
        pool = [c for c in activation_candidates(gm, best, n, batch_axis, batch) if c not in tried]
        if not pool:
            break
        trials = []
        for node, p in pool:
            tried.add((node, p))
            try:
                trial = propagate(gm, n, {**seeds, node: p}, forced)
            except WholeGraphFallback:
                continue
            if node in trial.seeds:
                trials.append((trial, node, p))
        if not trials:
            break
        if seeds and replicated_share(gm, best, n) < SPLIT_SHARE:
            prop, node, p = min(trials, key=lambda t: t[0].cost)
            if prop.cost >= best.cost * 0.999:
                break
        else:
            prop, node, p = min(trials, key=lambda t: (t[0].compute, t[0].cost))
            if prop.compute >= best.compute * 0.95:
                break
        log.debug("activation seed %s: %s (cost %.3g -> %.3g)", node.name, p, best.cost, prop.cost)
        seeds[node] = p
        best = prop
    return best
