"""Choose which user inputs to shard, and on which dim, by comparing propagated plans.

Reads: placeholders' example values; user seeds (``ParallelPlan``-level input placements).
Writes: nothing; returns the seeds. Greedy: take the (input, dim) that splits the most work, then add the
one that lowers the estimated per-rank cost most, until nothing helps. Every candidate plan is
correct (rules preserve meaning), so the search only trades speed.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch.fx as fx

from ..graph import input_label, is_tensor, is_user_input, shape
from ..placements import Placement, shard
from .activation_seeds import add_activation_seeds
from .propagate import Propagation, WholeGraphFallback, propagate

log = logging.getLogger("xdit_compile.seeds")


def candidates(gm: fx.GraphModule, n: int, batch_axis: bool, batch: int | None = None) -> list[tuple[fx.Node, Placement]]:
    """(input, placement) pairs worth trying on an axis of ``n`` ranks.

    The batch axis splits dim 0. The sequence axis never splits a batch dim (dim 0 of a
    tensor of rank >= 3, or of size ``batch``): that would be data parallelism in disguise,
    and the batch may already belong to the batch axis.
    """
    out = []
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
    return out


def choose_seeds(
    gm: fx.GraphModule,
    n: int,
    batch_axis: bool,
    batch: int | None = None,
    fixed: Mapping[fx.Node, Placement] | None = None,
    forced: Mapping[fx.Node, Placement] | None = None,
) -> Propagation:
    """The propagation of the cheapest seed set found (``fixed`` seeds are always kept)."""
    seeds = dict(fixed or {})
    best = propagate(gm, n, seeds, forced)
    pool = [c for c in candidates(gm, n, batch_axis, batch) if c[0] not in seeds]
    refused: dict[fx.Node, str] = {}
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
    # Work no input split reaches (a buffer packed inside the graph, a graph after a break
    # whose inputs are small): try seeds on the activations themselves.
    best = add_activation_seeds(gm, n, batch_axis, batch, seeds, best, forced)
    if not seeds:
        # Nothing was sharded: say which inputs could not be, and why, in the report.
        best.fallbacks.extend(refused.items())
    return best
