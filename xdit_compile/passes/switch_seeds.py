"""Switch seeds: re-shard an activation on another dim where an attention runs over the sharded dim.

A spatial-temporal model shards its frames, and attention within each frame is then local (the
frames are its batch). Its attention across frames has the frames as its sequence, and on that
plan it lowers to Ulysses: q, k, v and the output each cross the axis (four activation-sized
all-to-alls, counted as ``strategies/ulysses.py`` counts them). Switching the activation that
feeds it to a shard of the positions (one all-to-all, ``runtime/reshard.py``) makes that
attention local too, and the residual add after it switches back (a second all-to-all): DSP
(Dynamic Sequence Parallelism), found by cost, without annotations::

    x: S(1) frames -> norm -> t = transpose(1, 2) -> reshape(B*S, T, D) -> qkv -> sdpa   (sequence: Ulysses)
    x: S(1) frames -> norm -> t = transpose(1, 2) ==reshard==> S(1) positions -> ... sdpa (local)
    x + out: out switched back to frames ==reshard==> S(1)

Candidates: only attentions lowered as sequence-parallel whose query has more independent
sequences than the data batch (``q.shape[0]`` is neither the batch nor below the axis size; an
image DiT's attention has only the batch there, and nothing to switch to). For each, the nodes
on its query's sharded path (up to ``MAX_DEPTH`` back from the query), each on every other dim
of at least ``n`` (a leading ``B * S`` dim split within each sample). First, one seed per qualifying attention at the same place on its path
(blocks repeat: one trial per place and dim, however deep the model); then singles, in graph
order, for the attentions still (or now) lowered as sequence-parallel, at most ``MAX_SINGLES``. A seed set is
kept only when it lowers the estimated cost (``Propagation.cost``).

Reads: ``node.meta["val"|"example_value"]`` (global shapes) and a ``Propagation``. Writes
nothing; returns the cheaper propagation (its ``switched`` holds the seeds that switch).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch.fx as fx

from ..graph import has_side_effects, is_tensor, op_name, shape
from ..placements import Placement, Shard, shard
from ..rules.attention import sdpa_args
from .propagate import Propagation, try_propagate

log = logging.getLogger("xdit_compile.seeds")

MAX_DEPTH = 8  # nodes back from the query that may carry the switch
MAX_SINGLES = 4  # attentions tried one by one after the uniform round
LOOKAHEAD = 2  # of those trials, the cheapest that leave a later attention sequence-parallel are tried with its switch


def _qualifies(node: fx.Node, prop: Propagation, n: int, batch: int | None) -> bool:
    d = prop.decisions.get(node)
    if d is None or d.attention != "sequence":
        return False
    q = sdpa_args(node).get("query")
    s = shape(q) if isinstance(q, fx.Node) else ()
    return len(s) >= 3 and isinstance(s[0], int) and s[0] >= n and s[0] != batch


def _path(node: fx.Node, prop: Propagation) -> list[fx.Node]:
    """The query's sharded producers, nearest first (through multi-output ops such as ``chunk``,
    which are not candidates themselves)."""
    out: list[fx.Node] = []
    x = sdpa_args(node).get("query")
    steps = 0
    while isinstance(x, fx.Node) and len(out) < MAX_DEPTH and steps < 2 * MAX_DEPTH:
        if x.op not in ("call_function", "call_method") or has_side_effects(x) or not _sharded(prop.placements.get(x)):
            break
        if is_tensor(x):
            out.append(x)
        steps += 1
        x = next((y for y in x.all_input_nodes if _sharded(prop.placements.get(y))), None)
    return out


def _sharded(p: object) -> bool:
    return isinstance(p, Shard) or (isinstance(p, tuple) and any(isinstance(q, Shard) for q in p))


def _options(x: fx.Node, prop: Propagation, n: int, batch: int | None) -> list[Shard]:
    """Shards of ``x`` on its other dims. A leading dim that merges the batch with positions
    (``B * S``) is split within each sample (segments of ``S``), never across samples: that
    would be data parallelism in disguise (``choose_seeds.candidates`` refuses it for inputs)."""
    s, have = shape(x), prop.placements.get(x)
    if not all(isinstance(v, int) for v in s) or not isinstance(have, Shard):
        return []
    out: list[Shard] = []
    for d in range(len(s)):
        if d == have.dim or s[d] < n:
            continue
        if d > 0 or batch is None or batch <= 1:
            out.append(shard(d, s[d]))
        elif s[0] % batch == 0 and s[0] // batch >= n:
            out.append(Shard(0, (s[0] // batch,) * batch))
    return out



def add_switch_seeds(gm: fx.GraphModule, n: int, batch: int | None, best: Propagation,
                     forced: Mapping[fx.Node, Placement] | None = None) -> Propagation:
    """``best`` with switch seeds added where they lower the cost (see the module docstring)."""
    attention = [x for x in gm.graph.nodes if op_name(x) == "scaled_dot_product_attention"]
    sites = [x for x in attention if _qualifies(x, best, n, batch)]
    if not sites:
        return best
    paths = {a: _path(a, best) for a in sites}
    # Uniform round: the k-th node back from every qualifying query, switched to dim d.
    trials: list[tuple[Propagation, dict[fx.Node, Shard]]] = []
    for k in range(MAX_DEPTH):
        at = [p[k] for p in paths.values() if len(p) > k]
        if not at:
            break
        dims = {pl.dim for pl in _options(at[0], best, n, batch)}
        for d in sorted(dims):
            add = {x: p for x in at for p in _options(x, best, n, batch) if p.dim == d}
            prop = try_propagate(gm, n, {**best.seeds, **add}, forced)
            if prop is not None and any(x in prop.switched for x in add):
                trials.append((prop, add))
    best = _take(best, trials)
    # Singles, in graph order, for what is still lowered as sequence-parallel (a switch may make
    # a later attention sequence-parallel: a spatial one after the positions were switched in).
    tried: set[fx.Node] = set()
    while len(tried) < MAX_SINGLES:
        a = next((x for x in attention if x not in tried and _qualifies(x, best, n, batch)), None)
        if a is None:
            break
        tried.add(a)
        trials = _singles(gm, n, batch, best, a, {}, forced)
        # A switch that makes a later attention sequence-parallel (the residual stream it leaves
        # behind is sharded the other way) may pay off only with that attention's own switch.
        for prop, add in sorted(trials, key=lambda t: t[0].cost)[:LOOKAHEAD]:
            later = next((x for x in attention[attention.index(a) + 1:]
                          if _qualifies(x, prop, n, batch) and not _qualifies(x, best, n, batch)), None)
            if later is not None:
                trials += _singles(gm, n, batch, prop, later, add, forced)
        best = _take(best, trials)
    return best


def _singles(gm: fx.GraphModule, n: int, batch: int | None, base: Propagation, a: fx.Node,
             add: dict[fx.Node, Shard], forced: Mapping[fx.Node, Placement] | None,
             ) -> list[tuple[Propagation, dict[fx.Node, Shard]]]:
    """Plans with one more switch seed (on top of ``base``'s seeds and ``add``) on ``a``'s query path."""
    out = []
    for x in _path(a, base):
        for p in _options(x, base, n, batch):
            prop = try_propagate(gm, n, {**base.seeds, **add, x: p}, forced)
            if prop is not None and x in prop.switched:
                out.append((prop, {**add, x: p}))
    return out


def _take(best: Propagation, trials: list[tuple[Propagation, dict[fx.Node, Shard]]]) -> Propagation:
    if not trials:
        return best
    prop, add = min(trials, key=lambda t: t[0].cost)
    if prop.cost >= best.cost * 0.999:
        return best
    log.debug("switch seeds %s (cost %.3g -> %.3g)", ", ".join(f"{x.name}: {p}" for x, p in add.items()),
              best.cost, prop.cost)
    return prop
