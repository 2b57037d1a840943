"""Propagate placements on one mesh axis through every node, by the rule tables.

Reads: ``node.meta["val"|"example_value"]`` (global shapes), the seeds (placements given to
user inputs) and forced placements (user annotations).
Writes: nothing on the graph; returns a ``Propagation`` that the lowering applies and that
the seed search scores. (Kept side-effect free so the search can run it many times.)

    x: R --seed S(2)--> conv2d --> flatten(2) --> transpose --> linear --> sdpa ...
             S(2)         S(2)       S(2:8x8)       S(1:8x8)      S(1:8x8)   sequence
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx as fx

from ..errors import ShardingError
from ..graph import has_symbolic_shape, is_tensor, op_name, shape, value, written_inputs
from ..placements import REPLICATE, Partial, Placement, Replicate, Shard, fmt, local_length
from ..rules.core import AttentionRole, Decision, OpView, replicate_all
from ..rules.factory import FROM_SIZES, LIKE
from ..rules.table import RULES
from ..strategies.registry import planning_cost
from ..runtime.reshard import received_bytes

# Ops whose result may share storage with their first argument (a write through one is seen
# through the other). Over-approximate: ``float``/``contiguous``/``reshape`` only alias when
# they have nothing to do, but assuming they always may only costs a fallback.
_MAY_ALIAS = {
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
    "permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis", "expand", "expand_as",
    "broadcast_to", "getitem", "narrow", "select", "split", "split_with_sizes", "chunk", "unbind", "detach",
    "contiguous", "to", "type_as", "float", "half", "bfloat16", "double", "type", "view_as_real",
    "view_as_complex", "real", "imag", "as_strided", "diagonal", "unfold", "alias", "clone_unused",
}


FLOPS_PER_BYTE = 200.0
FLOPS_PER_COLLECTIVE = 2e6


class WholeGraphFallback(ShardingError):
    """Sharding this graph would change its meaning (e.g. an in-place write to a shard copy)."""


@dataclass
class Propagation:
    """Placements and decisions of every node on one axis, and the estimated cost."""

    placements: dict[fx.Node, Any]
    decisions: dict[fx.Node, Decision]
    seeds: dict[fx.Node, Placement]
    compute: float = 0.0
    comm_bytes: float = 0.0
    collectives: int = 0
    fallbacks: list[tuple[fx.Node, str]] = field(default_factory=list)
    # Every member of an alias group that is written in place -> the writes to that group, in
    # graph order. The lowering redistributes such a member after the last write before its
    # reader, so the copy holds what the reader would see.
    group_writes: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    # Buffers made by a factory for an ``out=`` write that is their first use: each rank makes
    # only its shard (the lowering slices them right where they are made, like seeds).
    fresh: dict[fx.Node, Placement] = field(default_factory=dict)
    # Activation seeds on values that are already sharded -> the placement the node computes in;
    # the lowering switches them to the seed right after (``runtime/reshard.py``: one all-to-all).
    switched: dict[fx.Node, Placement] = field(default_factory=dict)

    @property
    def cost(self) -> float:
        # Machines compute far faster than they communicate: ~50 flops per byte moved on CPU
        # ranks over gloo, over 1,000 on GPUs over NVLink. 200 keeps activation-sized
        # collectives (per-layer K/V of text) more expensive than the projections they save.
        # Each collective also costs a fixed latency worth a few million flops.
        return self.compute + FLOPS_PER_BYTE * self.comm_bytes + FLOPS_PER_COLLECTIVE * self.collectives


def _numel(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        out = 1
        for d in v.shape:
            out *= _size(d)
        return out
    if isinstance(v, (tuple, list)):
        return sum(_numel(x) for x in v)
    return 0


def _size(d: Any) -> int:
    """A size for cost estimates. Data-dependent (unbacked) sizes have no value at compile time:
    their upper bound where the shape environment knows one (``nonzero`` of N elements: N), else
    a guess. A bound keeps a small data-dependent stretch from outweighing the rest of the graph."""
    if isinstance(d, int):
        return d
    try:
        upper = d.node.shape_env.bound_sympy(d.node.expr).upper
        if upper.is_finite and int(upper) < 2**31:
            return max(int(upper), 1)
    except (AttributeError, TypeError, ValueError):
        pass
    return 64


def _elsize(v: Any) -> int:
    return v.element_size() if isinstance(v, torch.Tensor) else 4


def _share(p: Any, n: int) -> float:
    """Fraction of a tensor's elements a rank holds (or computes) under placement ``p``."""
    if isinstance(p, Shard):
        return local_length(p, n, 0) / max(p.length, 1)
    if isinstance(p, tuple):
        shares = [_share(x, n) for x in p if x is not None]
        return min(shares) if shares else 1.0
    return 1.0


def estimate_flops(node: fx.Node, name: str | None) -> float:
    """Rough flops of a node on full tensors (only used to compare plans)."""
    out = value(node)
    n_out = _numel(out)
    try:
        if name == "linear":
            return 2.0 * n_out * _size(shape(node.args[1])[-1])
        if name in ("matmul", "bmm", "mm", "einsum"):
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            k = max(1, (_numel(value(operands[0])) * _numel(value(operands[-1])) / max(n_out, 1)) ** 0.5)
            return 2.0 * n_out * k
        if name == "scaled_dot_product_attention":
            q = node.args[0] if node.args else node.kwargs["query"]
            k = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
            return 4.0 * _numel(value(q)) * _size(shape(k)[-2])
        if name and name.startswith("conv"):
            w = shape(node.args[1])
            return 2.0 * n_out * _numel(value(node.args[1])) / max(_size(w[0]), 1)
    except (IndexError, KeyError, TypeError, AttributeError):
        pass
    return float(n_out)


def redistribution_bytes(src: Any, dst: Any, v: Any, n: int) -> float:
    """Bytes a rank receives to turn placement ``src`` into ``dst`` (0 for free slices)."""
    if src == dst or isinstance(dst, type(None)) or not isinstance(v, torch.Tensor):
        return 0.0
    # One collective per change, priced by what it moves (``runtime/reshard.py``'s table): an
    # all-to-all S(a) -> S(b) moves 1/n of a gather, a reduce-scatter P -> S half an all-reduce.
    return received_bytes(src, dst, _numel(v) * _elsize(v), n)


def _count(result: Propagation, src: Any, dst: Any, v: Any, n: int) -> None:
    nbytes = redistribution_bytes(src, dst, v, n)
    result.comm_bytes += nbytes
    if nbytes:
        result.collectives += 1


def propagate(
    gm: fx.GraphModule,
    n: int,
    seeds: Mapping[fx.Node, Placement],
    forced: Mapping[fx.Node, Placement] | None = None,
) -> Propagation:
    """Placements of every node when ``seeds`` are sharded on an axis of ``n`` ranks."""
    forced = forced or {}
    pl: dict[fx.Node, Any] = {}
    decisions: dict[fx.Node, Decision] = {}
    result = Propagation(pl, decisions, dict(seeds))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            pl[node] = seeds.get(node, REPLICATE if is_tensor(node) else None)
            continue
        if node.op == "get_attr":
            pl[node] = REPLICATE if is_tensor(node) else None
            continue
        if node.op == "output":
            needs = {x: REPLICATE for x in node.all_input_nodes if is_tensor(x) and not isinstance(pl.get(x), Replicate)}
            decisions[node] = Decision(None, needs)
            for x, want in needs.items():
                _count(result, pl[x], want, value(x), n)
            continue
        name = op_name(node)
        d = _decide(node, name, pl, n, forced)
        d = _fresh_out_buffer(node, d, pl, decisions, result.fresh)
        d = _replicated_write(node, name, d, pl, n)
        w = _write_conflict(node, d, pl)
        if w is not None:
            have, moved = pl.get(w), w in d.needs
            raise WholeGraphFallback(
                f"in-place op {name} on node {node.name} would write a redistributed copy or the wrong part of "
                f"{w.name} (placement {fmt(have)}"
                + (f" -> {fmt(d.needs[w])})" if moved else f", result {fmt(d.out)})")
            )
        pl[node] = d.out
        decisions[node] = d
        _seed_activation(node, d, seeds, result, n)
        if d.note:
            result.fallbacks.append((node, d.note))
        for x, want in d.needs.items():
            _count(result, pl.get(x), want, value(x), n)
        result.collectives += d.comm.collectives
        result.comm_bytes += d.comm.nbytes
        work = estimate_flops(node, name)
        share = _share(d.out, n)
        if d.attention is AttentionRole.SEQUENCE:  # the registry's planning strategy says what it moves
            q = node.args[0] if node.args else node.kwargs["query"]
            k = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
            cost = planning_cost(node.name, _numel(value(q)) * _elsize(value(q)), _numel(value(k)) * _elsize(value(k)), n)
            result.comm_bytes += cost.total_bytes
            result.collectives += cost.collectives
        result.compute += work * share
    _check_aliasing(gm, result)
    return result


def try_propagate(gm: fx.GraphModule, n: int, seeds: Mapping[fx.Node, Placement],
                  forced: Mapping[fx.Node, Placement] | None = None) -> Propagation | None:
    """``propagate``, or ``None`` where the seeds would make the whole graph fall back (a trial of the
    plan searches, which then drop that candidate)."""
    try:
        return propagate(gm, n, seeds, forced)
    except WholeGraphFallback:
        return None


def _write_conflict(node: fx.Node, d: Decision, pl: dict[fx.Node, Any]) -> fx.Node | None:
    """The first input ``node`` writes that decision ``d`` would write wrongly, if any.

    A write into a shard must be a rule's local write of the placement the rule gives its
    result; anything else (a write into a gathered copy, at global offsets into a local
    shard, or an ``out=`` tensor placed unlike the result) is wrong.
    """
    for w in written_inputs(node):
        have = pl.get(w)
        if w in d.needs or (d.note is not None and not isinstance(have, Replicate)) or (
            isinstance(d.out, (Replicate, Shard, Partial)) and d.out != have
        ):
            return w
    return None


# Ops that make a tensor whose values an ``out=`` write replaces entirely.
_FRESH = frozenset(FROM_SIZES + LIKE) - {"tensor", "as_tensor", "new_tensor"}


def _fresh_out_buffer(node: fx.Node, d: Decision, pl: dict[fx.Node, Any], decisions: dict[fx.Node, Decision],
                      fresh: dict[fx.Node, Placement]) -> Decision:
    """An ``out=`` buffer made only to receive this op's result takes the result's shard.

        c = torch.empty(2, 8, 8): R; torch.add(x: S(1), 1.0, out=c)   ->  c: S(1), each rank makes its rows

    Only when nothing read the buffer before (this op is its first user) and the result has
    its shape: the write replaces every value, so the buffer's own values never matter.
    """
    w = node.kwargs.get("out")
    if not isinstance(w, fx.Node) or not isinstance(d.out, Shard) or d.needs.get(w) != d.out or d.local is not None:
        return d
    if op_name(w) not in _FRESH or not isinstance(pl.get(w), Replicate) or any(u in decisions for u in w.users):
        return d
    if not is_tensor(node) or shape(w) != shape(node):
        return d
    pl[w] = fresh[w] = d.out
    return dataclasses.replace(d, needs={x: p for x, p in d.needs.items() if x is not w})


def _replicated_write(node: fx.Node, name: str | None, d: Decision, pl: dict[fx.Node, Any], n: int) -> Decision:
    """A write into replicated tensors that the rule would shard runs replicated instead.

        c: R = empty(..); add(x: S(1), 1, out=c)   the rule says S(1), but c holds every row:
                                                   x is gathered and every rank writes all of c
        table: R; table[..., :4].copy_(x: S(1))    x is gathered, the write stays replicated

    Always correct (each rank does what one rank does); only writes into non-replicated
    tensors can conflict for real, and ``propagate`` refuses those.
    """
    written = written_inputs(node)
    if not written or not all(isinstance(pl.get(w), Replicate) for w in written) or _write_conflict(node, d, pl) is None:
        return d
    view = OpView(node, pl, n, name or str(node.target))
    return replicate_all(view, f"in-place {name} writes replicated {', '.join(w.name for w in written)}: "
                               "its inputs are gathered and every rank writes the whole tensor")


def _check_aliasing(gm: fx.GraphModule, result: Propagation) -> None:
    """Refuse plans where an in-place write and a redistribution copy disagree about aliasing.

    In eager, views share storage: a write through one alias is seen by every other. In the
    per-rank program a redistributed alias is a copy. The lowering makes the copy of a member
    of a written alias group after the last write to the group that comes before the reader
    (``result.group_writes``), so a reader that only reads sees what eager would. A write is
    still lost, and the plan refused, when

    * a view reads a redistributed member of a written group, and the group is written after
      that view is made: the later write lands in (or misses) the copy;
    * a sharded input (its local slice is a copy) belongs to a written group.
    """
    nodes = list(gm.graph.nodes)
    writes = {n: w for n in nodes if (w := written_inputs(n))}
    if not writes:
        return
    pos = {n: i for i, n in enumerate(nodes)}
    parent: dict[fx.Node, fx.Node] = {}

    def root(x: fx.Node) -> fx.Node:
        while parent.get(x, x) is not x:
            x = parent.get(x, x)
        return x

    def aliases_arg0(n: fx.Node) -> bool:
        name = op_name(n)
        return bool(n.args) and isinstance(n.args[0], fx.Node) and (name in _MAY_ALIAS or n.args[0] in writes.get(n, ()))

    for n in nodes:
        # A write's result aliases what it writes (``out=`` returns the ``out`` tensor).
        for t in ([n.args[0]] if aliases_arg0(n) else []) + writes.get(n, []):
            a, b = root(n), root(t)
            if a is not b:
                parent[a] = b
    written: dict[fx.Node, list[int]] = {}
    for w, targets in writes.items():
        for t in dict.fromkeys(root(t) for t in targets):
            written.setdefault(t, []).append(pos[w])
    for x in nodes:
        if (times := written.get(root(x))) is not None:
            result.group_writes[x] = [nodes[t] for t in times]
    for ph, p in result.seeds.items():
        # A seed's slice is a copy taken right after it: writes before it are in the copy.
        if not isinstance(p, Replicate) and any(t > pos[ph] for t in written.get(root(ph), ())):
            raise WholeGraphFallback(f"input {ph.name} is written in place but would be sharded (a copy)")
    for user, d in result.decisions.items():
        for x, want in d.needs.items():
            times = written.get(root(x))
            if not times or result.placements.get(x) == want:
                continue
            alias_edge = aliases_arg0(user) and user.args[0] is x
            later = [nodes[t].name for t in times if t > pos[user]]
            if alias_edge and later:
                raise WholeGraphFallback(
                    f"{user.name} would view a redistributed copy ({fmt(result.placements.get(x))} -> {fmt(want)}) "
                    f"of {x.name}, whose storage {', '.join(later)} write(s) in place afterwards: the write would miss "
                    "the copy; compute the view from a clone, or write before viewing")


def _seed_activation(node: fx.Node, d: Decision, seeds: Mapping[fx.Node, Placement], result: Propagation,
                     n: int) -> None:
    """A seed on a node made inside the graph: it is computed whole, then each rank keeps its
    slice (the lowering slices it right after it, as it does a seeded input). A seed on a node
    sharded on another dim is a switch: one all-to-all right after it, counted here
    (``Propagation.switched``). A seed on anything else is dropped."""
    if node not in seeds:
        return
    want = seeds[node]
    if isinstance(d.out, Replicate) and isinstance(want, Shard):
        result.placements[node] = want
    elif isinstance(d.out, Shard) and isinstance(want, Shard) and want.dim != d.out.dim and d.local is None \
            and d.attention is None and not written_inputs(node):
        result.placements[node] = want
        result.switched[node] = d.out
        _count(result, d.out, want, value(node), n)
    else:
        result.seeds.pop(node, None)


def _decide(node: fx.Node, name: str | None, pl: dict[fx.Node, Any], n: int, forced: Mapping[fx.Node, Placement]) -> Decision:
    inputs = [x for x in node.all_input_nodes]
    if node in forced:
        src = node.args[0]
        return Decision(forced[node], {src: forced[node]} if pl.get(src) != forced[node] else {})
    v = value(node)
    tensor_out = isinstance(v, torch.Tensor) or (
        isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))
    writes = bool(written_inputs(node))
    if not tensor_out and not writes:
        # Sizes, dtypes, devices: the lowering pins them to their global values.
        return Decision(None)
    if all(isinstance(pl.get(x), Replicate) or pl.get(x) is None for x in inputs):
        return Decision(_replicated(v))
    view = OpView(node, pl, n, name or str(node.target))
    if has_symbolic_shape(node) or any(has_symbolic_shape(x) for x in inputs):
        # Static graphs keep symbolic sizes only where they depend on data (nonzero, item): the
        # backend specialises every other symbolic size to the call's shapes (specialize.py).
        return replicate_all(view, "symbolic shapes (data-dependent sizes) are not sharded")
    rule = RULES.get(name or "")
    d = rule(view) if rule is not None else None
    partial = [x for x in inputs if isinstance(pl.get(x), Partial)]
    if d is None and rule is not None and partial:
        # Reduce the partial sums first (an all-reduce), then ask the rule again.
        reduced = {**pl, **{x: REPLICATE for x in partial}}
        d = rule(OpView(node, reduced, n, name or str(node.target)))
        if d is not None:
            d = dataclasses.replace(d, needs={**{x: REPLICATE for x in partial}, **d.needs})
    if d is None:
        reason = node.meta.get("xdit", {}).get("why_replicated") or (f"no sharding rule for op {name!r}" if rule is None else (
            f"{name} has no rule for inputs " + ", ".join(f"{x.name}: {fmt(pl.get(x))}" for x in inputs)))
        d = replicate_all(view, reason)
    return d


def _replicated(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return tuple(_replicated(x) for x in v)
    return REPLICATE if isinstance(v, torch.Tensor) else None
