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

from ..graph import arg, input_label, is_tensor, is_user_input, op_name, shape
from ..placements import Placement, Shard, pieces, same_layout, shard
from .activation_seeds import add_activation_seeds
from .propagate import Propagation, WholeGraphFallback, propagate

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
