"""Megatron sequence parallel on the ``tp`` axis: partial sums reduce-scattered into token shards.

Under plain tensor parallel (``tensor_parallel.choose_tp``) the partial sum ``P`` of a
row-parallel linear is all-reduced where a rule needs it whole: the residual add. Then every tp
rank runs the token-local ops that follow (bias, residual add, norm, modulation, gating) on
every token, and holds the whole residual stream. Megatron-SP instead reduce-scatters the
partial sum along the tokens, runs those ops on 1/n of the tokens, and all-gathers the tokens
again right before the next column-parallel linear::

    plain TP:   attn_out: P --all-reduce--> R -> add(x: R) -> norm -> modulate -> to_q(W: S(0))
    TP + SP:    attn_out: P --reduce-scatter--> S(1) -> add(x: S(1)) -> norm -> modulate
                    --all-gather--> R -> to_q(W: S(0))

A reduce-scatter plus an all-gather receive what one all-reduce receives (``runtime/reshard.py``
table), so the bytes stay Megatron's; the norm / pointwise work and the residual stream's
activation memory are divided by n.

Nothing here is written per model: after ``choose_tp`` has its plan, ``sequence_shard`` puts an
``xdit::mark`` forced ``R`` on the input of every column-parallel linear (where the tokens are
gathered; a no-op while that input is whole) and then tries, in graph order, each partial sum
that the plan all-reduces with a mark forced ``S(token dim)`` (the reduce-scatter). The
propagation carries the token shard through the residual stream by the existing rules (a later
partial sum met by a token-sharded residual is reduce-scattered by the pointwise rule itself).
A trial is kept when

* the propagation accepts it (no whole-graph fallback),
* it receives no more bytes than the plan it replaces (no gather the all-reduce did not pay for),
* every token shard has a reader that computes on it (a token-local consumer: a partial sum
  that only feeds the next projection is all-reduced as before), and
* no rank does more work (estimated flops; no split weight is gathered back).

The token dim of a ``[B, S, D]`` activation is its largest dim between the first and the last;
a tensor without one (``[B, D]``: the timestep embedding) keeps its all-reduce. Tokens the
degree does not divide keep the all-reduce too, and the report says so (the replicated list).

Reads ``node.meta["val"]`` (shapes) through the propagation; writes ``xdit::mark`` nodes into
the graph (``strip_marks`` removes them after lowering) and returns the new ``Propagation``
with the forced placements of the marks it kept.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.fx as fx

from .errors import ShardingError
from .graph import op_name, shape, value
from .placements import REPLICATE, Partial, Placement, Replicate, Shard, fmt
from .passes.choose_seeds import _split_seed, _unit_cuts
from .passes.propagate import _MAY_ALIAS, Propagation, try_propagate

log = logging.getLogger("xdit_compile.tp")

TP = "tp"
REFINE_ROUNDS = 6  # propagations per trial: the first, idle marks dropped, shards re-segmented
BYTES_SLACK = 1e-6  # relative: float sums of the same bytes in another order


def token_dim(node: fx.Node) -> int | None:
    """The dim of ``node``'s value that holds its tokens: the largest dim strictly between the first
    (the batch) and the last (the features), or None for a tensor with no such dim of size > 1."""
    v = value(node)
    if not isinstance(v, torch.Tensor) or v.dim() < 3 or not v.is_floating_point():
        return None
    s = shape(node)
    inner = [d for d in range(1, len(s) - 1) if isinstance(s[d], int) and s[d] > 1]
    if not inner:
        return None
    return max(inner, key=lambda d: (s[d], d))


def _mark_after(gm: fx.GraphModule, node: fx.Node, dim: int, users: list[fx.Node] | None = None) -> fx.Node:
    """An ``xdit::mark`` of ``node`` on the tp axis read by ``users`` (default: every user of ``node``)."""
    with gm.graph.inserting_after(node):
        m = gm.graph.call_function(torch.ops.xdit.mark.default, (node, TP, dim))
    for key in ("val", "example_value"):
        if key in node.meta:
            m.meta[key] = node.meta[key]
    targets = set(users) if users is not None else None
    node.replace_all_uses_with(m, delete_user_cb=lambda u: u is not m and (targets is None or u in targets))
    return m


def _unmark(gm: fx.GraphModule, m: fx.Node) -> None:
    m.replace_all_uses_with(m.args[0])
    gm.graph.erase_node(m)


def _column_linears(gm: fx.GraphModule, prop: Propagation) -> dict[fx.Node, list[fx.Node]]:
    """Input -> the column-parallel linears reading it (weight seeded ``S(0)`` on the tp axis)."""
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if op_name(node) != "linear" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        p = prop.seeds.get(w) if isinstance(w, fx.Node) else None
        if isinstance(p, Shard) and p.dim == 0:
            out.setdefault(node.args[0], []).append(node)
    return out


def _all_reduced(prop: Propagation) -> list[fx.Node]:
    """Partial sums that some reader needs whole (an all-reduce), in graph order of the producer."""
    seen: dict[fx.Node, None] = {}
    for d in prop.decisions.values():
        for x, want in d.needs.items():
            if isinstance(prop.placements.get(x), Partial) and isinstance(want, Replicate):
                seen[x] = None
    order = {n: i for i, n in enumerate(prop.placements)}
    return sorted(seen, key=lambda n: order.get(n, 0))


def _moves(prop: Propagation) -> set[str]:
    """Every redistribution of a plan, spelled for the debug log."""
    return {f"{x.name} {fmt(prop.placements.get(x))} -> {fmt(want)} for {u.name}"
            for u, d in prop.decisions.items() for x, want in d.needs.items() if prop.placements.get(x) != want}


def _weight_gathers(prop: Propagation) -> int:
    """Split parameters some reader wants whole again (a plan that undid a weight split)."""
    return sum(1 for d in prop.decisions.values() for x, want in d.needs.items()
               if x in prop.seeds and isinstance(want, Replicate))


def _candidates(prop: Propagation, n: int) -> tuple[list[tuple[fx.Node, Shard]], list[tuple[fx.Node, str]]]:
    """The all-reduced partial sums that have a token dim the degree divides (with their token
    shard), and one note per token count the degree does not divide (on its first partial sum)."""
    found: list[tuple[fx.Node, Shard]] = []
    odd: dict[tuple[int, int], list[fx.Node]] = {}
    for x in _all_reduced(prop):
        t = token_dim(x)
        if t is None:
            continue  # no tokens (a [B, D] embedding): the all-reduce stays
        tokens = shape(x)[t]
        if tokens % n:
            odd.setdefault((t, tokens), []).append(x)
            continue
        found.append((x, Shard(t, (tokens,), 1)))
    notes = [(xs[0], f"tensor parallel: {len(xs)} partial sum(s) ({', '.join(x.name for x in xs)}; "
                     f"{tuple(shape(xs[0]))}) all-reduced, not reduce-scattered into token shards: their {tokens} "
                     f"tokens (dim {t}) do not divide by tensor_parallel_degree {n} (use a resolution whose token "
                     f"count divides by {n})")
             for (t, tokens), xs in odd.items()]
    return found, notes


def _works_on_shard(m: fx.Node, prop: Propagation, marks: set[fx.Node]) -> bool:
    """Whether some op that computes (not a view, a cast or a mark) reads mark ``m``'s token shard,
    directly or through views."""
    todo, seen = list(m.users), set()
    while todo:
        u = todo.pop()
        if u in seen or u in marks or not isinstance(prop.placements.get(u), Shard):
            continue
        seen.add(u)
        if op_name(u) in _MAY_ALIAS:
            todo.extend(u.users)
        else:
            return True
    return False


def _refine(prop: Propagation, wants: dict[fx.Node, Shard]) -> dict[fx.Node, Shard] | None:
    """Token shards re-segmented to what their readers take, or None if none changes.

    A reader that wants a mark's tokens split otherwise on the same dim (a joint residual stream
    ``S(1:8+64)`` met by the single block's ``S(1)``) gets them so; a shard the graph cuts
    (``split([8, 64], dim=1)`` of a joint attention's output) ends a segment at each cut, as
    ``choose_seeds._refine_at_cuts`` does for input seeds.
    """
    out = dict(wants)
    for m, p in wants.items():
        for u in m.users:
            need = prop.decisions[u].needs.get(m) if u in prop.decisions else None
            if isinstance(need, Shard) and need.dim == p.dim and need.length == p.length and need != p:
                out[m] = need
                break
    for node, d in prop.decisions.items():
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        q = prop.placements.get(src) if src is not None else None
        if not isinstance(q, Shard) or src not in d.needs or isinstance(d.needs[src], Shard):
            continue
        for m, p in out.items():
            if p.segments == q.segments and p.inner == q.inner:
                cut = _split_seed(p, _unit_cuts(node, src, q))
                if cut is not None and cut != p:
                    out[m] = cut
    return out if out != wants else None


class _Search:
    """Trials of token shards on a set of partial sums against the best plan so far."""

    def __init__(self, gm: fx.GraphModule, n: int, best: Propagation, forced: dict[fx.Node, Placement],
                 gathers: list[fx.Node]) -> None:
        self.gm, self.n, self.best, self.forced, self.gathers = gm, n, best, forced, set(gathers)
        self.kept: dict[fx.Node, fx.Node] = {}  # partial sum -> its mark (forced to its token shard)

    def _marks(self) -> set[fx.Node]:
        return self.gathers | set(self.kept.values())

    def attempt(self, cands: list[tuple[fx.Node, Shard]]) -> bool:
        """Add token shards on ``cands`` (each kept only if some work runs on its shard); keep the
        result when it beats the best plan (see the module docstring)."""
        new = {x: _mark_after(self.gm, x, p.dim) for x, p in cands if x not in self.kept}
        wants = {m: p for (x, p) in cands if (m := new.get(x)) is not None}
        why = None
        refined_from: tuple[Propagation, dict[fx.Node, Shard]] | None = None
        for _ in range(REFINE_ROUNDS):
            trial = try_propagate(self.gm, self.n, self.best.seeds, {**self.forced, **wants})
            if trial is None and refined_from is None:
                why = "refused by the propagation"
                break
            if refined_from is not None and (trial is None or trial.comm_bytes >= refined_from[0].comm_bytes):
                trial, wants = refined_from[0], refined_from[1]  # the re-segmented shards did not pay
                break
            idle = [m for m in wants if not _works_on_shard(m, trial, self._marks() | set(wants))]
            for m in idle:  # its shard is gathered right away (no token-local reader): no mark
                wants.pop(m)
                new = {x: mm for x, mm in new.items() if mm is not m}
                _unmark(self.gm, m)
            if not wants:
                why = "no token-local op reads them before the next projection"
                break
            if idle:
                continue
            refined = _refine(trial, wants)
            if refined is None:
                break
            refined_from, wants = (trial, dict(wants)), refined
        if why is None:
            if trial.comm_bytes > self.best.comm_bytes * (1 + BYTES_SLACK) + 1:
                why = (f"would receive {trial.comm_bytes - self.best.comm_bytes:.0f} more bytes: "
                       + ", ".join(sorted(_moves(trial) - _moves(self.best))))
            elif trial.compute > self.best.compute * (1 + BYTES_SLACK) or _weight_gathers(trial) > _weight_gathers(self.best):
                # More work per rank: some layer would run whole that ran split (a weight gathered back).
                why = f"more work per rank ({trial.compute:.0f} against {self.best.compute:.0f} flops)"
        names = ", ".join(x.name for x, _ in cands)
        if why is not None:
            log.debug("tp sequence shard: %s kept all-reduced (%s)", names, why)
            for m in wants:
                _unmark(self.gm, m)
            return False
        log.debug("tp sequence shard: %s reduce-scattered into token shards", ", ".join(x.name for x in new))
        self.forced.update(wants)
        self.kept.update(new)
        self.best = trial
        return True


def sequence_shard(gm: fx.GraphModule, n: int, prop: Propagation,
                   forced: Mapping[fx.Node, Placement]) -> Propagation:
    """``prop`` (the tp plan) with partial sums reduce-scattered into token shards where that pays.

    See the module docstring. ``forced``: the plan's forced placements (``choose_tp``'s own marks);
    the marks kept here are forced too (the returned ``Propagation``'s decisions carry them to the
    lowering). Appends to ``fallbacks`` why a partial sum kept its all-reduce when its tokens do
    not divide by ``n``.
    """
    cands, notes = _candidates(prop, n)
    here: dict[fx.Node, Placement] = dict(forced)
    gathers: list[fx.Node] = []
    if cands:
        for x, linears in _column_linears(gm, prop).items():
            m = _mark_after(gm, x, -1, linears)
            here[m] = REPLICATE
            gathers.append(m)
    base = try_propagate(gm, n, prop.seeds, here) if gathers else None
    if base is None or base.comm_bytes > prop.comm_bytes * (1 + BYTES_SLACK) + 1:
        for m in gathers:  # no token shard to try, or gather points the plan cannot take
            _unmark(gm, m)
        prop.fallbacks.extend(notes)
        return prop
    search = _Search(gm, n, base, here, gathers)
    # The token shard flows on down the residual stream, but a partial sum read first by an op
    # that is not linear in it (dropout, a cast) needs its own reduce-scatter: try every partial
    # sum from the i-th on, for the first i that pays, then the earlier ones one by one.
    first = next((i for i in range(len(cands)) if search.attempt(cands[i:])), len(cands))
    for c in cands[:first]:
        search.attempt([c])
    if not search.kept:
        for m in gathers:
            _unmark(gm, m)
        prop.fallbacks.extend(notes)
        return prop
    # Gather points whose input stayed whole are no-ops: dropped again.
    best = search.best
    idle = [m for m in gathers if isinstance(best.placements.get(m.args[0]), Replicate)]
    for m in idle:
        here.pop(m)
        _unmark(gm, m)
    final = try_propagate(gm, n, best.seeds, here) if idle else best
    if final is None:
        raise ShardingError(f"tp sequence shard: dropping the idle gather marks {[m.name for m in idle]} (inputs "
                            "whole, no collective) made the propagation refuse the plan; please report this graph")
    final.fallbacks.extend(notes)
    return final
