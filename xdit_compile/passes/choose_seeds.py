"""Choose which user inputs to shard, and on which dim, by comparing propagated plans.

Reads: placeholders' example values; user seeds (``ParallelPlan``-level input placements).
Writes: nothing; returns the seeds. Greedy: take the (input, dim) that splits the most work, then add the
one that lowers the estimated per-rank cost most, until nothing helps. Then, bounded: pairs of seeds
that only pay off together, seeds that shard a stream whose attention still runs replicated, and
seeds re-segmented where the graph cuts them (``S(1)`` -> ``S(1:7+64)`` for ``x[:, :7]``). Every
candidate plan is correct (rules preserve meaning), so the search only trades speed.
"""

from __future__ import annotations

import itertools
import logging
from typing import Mapping

import torch.fx as fx

from ..graph import arg, input_label, is_tensor, is_user_input, op_name, shape
from ..placements import Placement, Shard, pieces, same_layout, shard
from ..rules import indexing
from ..rules.cat_split import cut_offsets
from .activation_seeds import add_activation_seeds
from .propagate import Propagation, WholeGraphFallback, propagate, try_propagate
from .switch_seeds import add_switch_seeds

log = logging.getLogger("xdit_compile.seeds")


def candidates(gm: fx.GraphModule, n: int, batch_axis: bool, batch: int | None = None) -> list[tuple[fx.Node, Placement]]:
    """(input, placement) pairs worth trying on an axis of ``n`` ranks.

    The batch axis splits dim 0. The sequence axis never splits a batch dim (dim 0 of a
    tensor of rank >= 3, or of size ``batch``): that would be data parallelism in disguise,
    and the batch may already belong to the batch axis. Where the graph cuts a dim into units
    (patches) that the plain split would cut through, it also proposes the shard in whole units.
    """
    out = []
    units = set() if batch_axis else _unit_hints(gm)
    for node in gm.graph.nodes:
        if node.op != "placeholder" or not is_tensor(node) or not is_user_input(node):
            continue
        s = shape(node)
        if not all(isinstance(d, int) for d in s):
            continue
        if batch_axis:
            # Only tensors that carry the batch: a length that happens to divide is not one.
            dims = [0] if len(s) >= 1 and (batch is None or s[0] == batch) else []
        else:
            dims = [d for d in range(len(s)) if len(s) >= 2 and not (d == 0 and (len(s) >= 3 or s[0] == batch))]
        for d in dims:
            if s[d] >= n:
                out.append((node, shard(d, s[d])))
                if not batch_axis:
                    out.extend((node, p) for p in _unit_shards(s[d], d, n, units))
    return out


_CONVS = ("conv1d", "conv2d", "conv3d", "convolution", "_convolution")


def _unit_hints(gm: fx.GraphModule) -> set[int]:
    """Unit sizes the graph cuts dims into: the strides of strided convolutions (patch embeddings)
    and the inner factor of views that split a user input's dim (``(B, C, H/p, p, W/p, p)``)."""
    units: set[int] = set()
    for node in gm.graph.nodes:
        name = op_name(node)
        if name in _CONVS:
            stride = arg(node, 3, "stride", 1)
            units.update(int(v) for v in ([stride] if isinstance(stride, int) else stride) if int(v) > 1)
        elif name in ("view", "reshape", "unflatten") and node.args and isinstance(node.args[0], fx.Node) \
                and node.args[0].op == "placeholder" and is_tensor(node) and is_tensor(node.args[0]):
            sizes_in, sizes_out = set(shape(node.args[0])), shape(node)
            units.update(int(b) for a, b in zip(sizes_out, sizes_out[1:])
                         if isinstance(a, int) and isinstance(b, int) and b > 1 and a * b in sizes_in)
    return units


def _unit_shards(length: int, dim: int, n: int, units: set[int]) -> list[Placement]:
    """Shards of ``length`` rows in whole units where the plain split would cut inside a unit.

    30 latent rows under a stride-2 patch embedding on 2 ranks: the plain split (15 + 15) cuts a
    patch, so the convolution would gather; ``S(dim:15x2)`` gives whole patch rows, 16 + 14.
    """
    plain = shard(dim, length)
    cuts = [start for r in range(n) for start, _ in pieces(plain, n, r)]
    out: list[Shard] = []
    for u in sorted(units):
        if length % u or length // u < n or not any(c % u for c in cuts):
            continue
        p = Shard(dim, (length // u,), u)
        if not any(same_layout(p, q, n) for q in [plain, *out]):
            out.append(p)
    return list(out)


def choose_seeds(
    gm: fx.GraphModule,
    n: int,
    batch_axis: bool,
    batch: int | None = None,
    fixed: Mapping[fx.Node, Placement] | None = None,
    forced: Mapping[fx.Node, Placement] | None = None,
    switches: bool = True,
) -> Propagation:
    """The propagation of the cheapest seed set found (``fixed`` seeds are always kept).

    ``switches``: also try switch seeds (``switch_seeds.py``); PipeFusion's programs, which
    pipeline the token shard through their attention, plan without them."""
    seeds = dict(fixed or {})
    best = propagate(gm, n, seeds, forced)
    pool = [c for c in candidates(gm, n, batch_axis, batch) if c[0] not in seeds]
    refused: dict[fx.Node, str] = {}
    asked = not seeds and not any(getattr(fp, "dim", None) is not None for fp in (forced or {}).values())
    last: list[tuple[Propagation, fx.Node, Placement]] = []  # the singles of the round that stopped the loop
    while pool:
        trials = []
        for node, p in pool:
            try:
                trials.append((propagate(gm, n, {**seeds, node: p}, forced), node, p))
            except WholeGraphFallback as e:
                refused.setdefault(node, f"input not sharded as {p}: {e}")
                continue
        if not trials:
            break
        if seeds or any(getattr(fp, "dim", None) is not None for fp in (forced or {}).values()):
            prop, node, p = min(trials, key=lambda t: t[0].cost)
            if prop.cost >= best.cost * 0.999:
                last = trials
                break
        else:
            # The caller asked for this axis: shard the input that splits the most work, even
            # when the model is too small for latency-aware costs to favour any split.
            prop, node, p = min(trials, key=lambda t: (t[0].compute, t[0].cost))
            if prop.compute >= best.compute * 0.99:
                break  # no input split shares out any work (e.g. a tiny graph of small ops)
        log.debug("seed %s: %s (cost %.3g -> %.3g)", input_label(node), p, best.cost, prop.cost)
        seeds[node] = p
        best = prop
        pool = [c for c in pool if c[0] is not node]
    if seeds:
        best = _more_seeds(gm, n, best, pool, forced, asked, last)
        best = _refine_at_cuts(gm, n, best, forced)
        seeds = dict(best.seeds)  # the searches above may have added or re-segmented seeds
    # Work no input split reaches (a buffer packed inside the graph, a graph after a break
    # whose inputs are small): try seeds on the activations themselves.
    best = add_activation_seeds(gm, n, batch_axis, batch, seeds, best, forced)
    if switches and not batch_axis:  # switch a sharded activation to another dim where that makes an attention local
        best = add_switch_seeds(gm, n, batch, best, forced)
    if not seeds:
        # Nothing was sharded: say which inputs could not be, and why, in the report.
        best.fallbacks.extend(refused.items())
    return best


# Bounds of the searches after the greedy loop (each trial is one propagation, ~1-20 ms).
PAIR_CANDIDATES = 3  # pairs among the cheapest remaining singles (+2 that shard attention): <= 10 trials
EXTRA_ROUNDS = 2  # rounds of singles + pairs after the greedy loop
REFINE_TRIALS = 6  # seeds re-segmented at the graph's cuts



def _replicated_attention(prop: Propagation) -> int:
    """Attention nodes that run on whole tensors (neither lowered to a sequence-parallel
    attention nor local on shards)."""
    return sum(1 for node, d in prop.decisions.items()
               if op_name(node) == "scaled_dot_product_attention" and d.attention is None)


def _more_seeds(
    gm: fx.GraphModule,
    n: int,
    best: Propagation,
    pool: list[tuple[fx.Node, Placement]],
    forced: Mapping[fx.Node, Placement] | None,
    asked: bool,
    last: list[tuple[Propagation, fx.Node, Placement]],
) -> Propagation:
    """Seeds the one-at-a-time loop cannot find: two that only pay off together, and streams
    whose own attention still runs replicated.

    Pairs: among the ``PAIR_CANDIDATES`` cheapest remaining single seeds, the pair (on two
    different inputs) that lowers the cost most. Streams (only when the caller asked for this
    axis, as for the first seed): a seed, or pair, that turns replicated attention into sharded
    attention and shares out more work is taken even when latency-aware costs of a tiny model
    do not favour it (a second stream's attention otherwise runs whole on every rank).
    """
    for _ in range(EXTRA_ROUNDS):
        if not pool:
            break
        if last:  # the loop just tried these singles against the same seeds
            singles = [(prop, (node, p)) for prop, node, p in last]
            last = []
        else:
            singles = [(prop, c) for c in pool if (prop := try_propagate(gm, n, {**best.seeds, c[0]: c[1]}, forced)) is not None]
        singles.sort(key=lambda t: t[0].cost)
        trials = [(prop, [c]) for prop, c in singles]
        # Pairs of the cheapest singles, and of the singles that shard a replicated attention.
        rep = _replicated_attention(best)
        top = [c for _, c in singles[:PAIR_CANDIDATES]]
        top += [c for prop, c in singles if c not in top and _replicated_attention(prop) < rep][:2]
        for a, b in itertools.combinations(top, 2):
            if a[0] is not b[0]:
                prop = try_propagate(gm, n, {**best.seeds, a[0]: a[1], b[0]: b[1]}, forced)
                if prop is not None:
                    trials.append((prop, [a, b]))
        if not trials:
            return best
        prop, added = min(trials, key=lambda t: t[0].cost)
        if prop.cost >= best.cost * 0.999:
            if not asked:
                return best
            better = [t for t in trials if _replicated_attention(t[0]) < rep and t[0].compute < best.compute * 0.99]
            if not better:
                return best
            prop, added = min(better, key=lambda t: (_replicated_attention(t[0]), t[0].cost))
        log.debug("seeds %s (cost %.3g -> %.3g)", ", ".join(f"{input_label(c[0])}: {c[1]}" for c in added),
                  best.cost, prop.cost)
        best = prop
        pool = [c for c in pool if all(c[0] is not a[0] for a in added)]
    return best


def _cuts(node: fx.Node, src: fx.Node, q: Shard) -> list[int]:
    """Global offsets along ``q.dim`` where a slice, narrow or split ``node`` cuts ``src`` (placed as ``q``)."""
    name = op_name(node)
    if name == "narrow":
        start, length = (node.args[2], node.args[3]) if len(node.args) >= 4 else (None, None)
        if not isinstance(start, int) or not isinstance(length, int):
            return []
        start = start + q.length if start < 0 else start
        return [start, start + length]
    if name != "getitem":
        return cut_offsets(node, name or "", src)
    index = indexing._basic(node.args[1]) if len(node.args) > 1 else None
    offsets: list[int] = []
    for _, e, in_dim, out_dim in indexing._walk(index, len(shape(src))) if index is not None else ():
        if in_dim == q.dim and out_dim is not None and isinstance(e, slice):
            offsets.extend(indexing._slice_bounds(e, q.length) or ())
    return offsets


def _refine_at_cuts(
    gm: fx.GraphModule, n: int, best: Propagation, forced: Mapping[fx.Node, Placement] | None,
) -> Propagation:
    """Seeds split into segments that end where the graph cuts the sharded dim.

    A joint input [text 7, image 64] sharded plainly puts token 7 inside rank 0's shard, so
    ``x[:, :7]`` gathers ``x``; seeded as ``S(1:7+64)`` every rank holds its part of each, and
    the slices are local. A cut on a tensor whose segments equal a seed's is mapped back to
    that seed (same units); kept when the plan gets cheaper.
    """
    tried: set[tuple[fx.Node, Shard]] = set()
    while len(tried) < REFINE_TRIALS:
        improved = False
        for node, d in best.decisions.items():
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            q = best.placements.get(src) if src is not None else None
            if not isinstance(q, Shard) or src not in d.needs or isinstance(d.needs[src], Shard):
                continue
            for ph, s in list(best.seeds.items()):
                if not isinstance(s, Shard) or s.segments != q.segments:
                    continue
                refined = _split_seed(s, _unit_cuts(node, src, q))
                if refined is None or refined == s or (ph, refined) in tried or len(tried) >= REFINE_TRIALS:
                    continue
                tried.add((ph, refined))
                prop = try_propagate(gm, n, {**best.seeds, ph: refined}, forced)
                if prop is not None and prop.cost < best.cost * 0.999:
                    log.debug("seed %s refined to %s at cuts of %s", input_label(ph), refined, node.name)
                    best, improved = prop, True
                    break
            if improved:
                break
        if not improved:
            return best
    return best


def _unit_cuts(node: fx.Node, src: fx.Node, q: Shard) -> list[int]:
    """The cuts of ``node`` on ``src`` (placed as ``q``) in units of ``q`` (whole units only)."""
    return sorted({o // q.inner for o in _cuts(node, src, q) if o % q.inner == 0 and 0 < o < q.length})


def _split_seed(s: Shard, units: list[int]) -> Shard | None:
    """``s`` with its segments also ending at unit offsets ``units``."""
    edges = {0}
    for u in s.segments:
        edges.add(max(edges) + u)
    edges |= set(units)
    ordered = sorted(edges)
    segs = tuple(b - a for a, b in zip(ordered[:-1], ordered[1:]))
    return Shard(s.dim, segs, s.inner) if all(segs) else None
