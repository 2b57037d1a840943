"""Apply a propagation to the graph: the per-rank program for one axis.

Reads: the ``Propagation`` of ``passes.propagate`` (placements, decisions, seeds).
Writes: the graph (slices after seeded inputs, collectives where placements change, each
rule's ``LocalOp`` performed by the surgery of its kind (``local_ops/``: local shapes in
view/split/slice args, halo exchanges, ...), attention lowered by the strategy registry (``strategies/``:
Ulysses/Ring/USP), replicated outputs)
and ``node.meta["xdit"][axis]`` = the node's placement on this axis, for the report;
``node.meta["xdit"]["strategy"]`` = the ``AttentionRecord`` of each attention (``strategies/base.py``).

Before (one rank's view of the global program)::

    x = placeholder; h = conv2d(x, w); t = flatten(h, 2).transpose(1, 2)
    q = view(linear(t, wq), 2, 64, 4, 16).transpose(1, 2); o = sdpa(q, k, v)

After (sp axis, 2 ranks, rank 0)::

    x0 = xdit_slice(x, 2, ((0, 8),)); h = conv2d(x0, w); ...
    q = reshape(linear(t, wq), (2, 32, 4, 16)).transpose(1, 2)
    o = ulysses_attention(q, k, v, group="1", q_sizes=[32, 32], kv_sizes=[32, 32])
    ...; out = xdit_gather(y, 2, [4, 4], "1")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..axis import Axis
from ..errors import ShardingError
from ..gradients import insert_grad_syncs, traced_for_autograd
from ..graph import eliminate_dead_code, shape, value
from ..placements import REPLICATE, Partial, Placement, Replicate, Shard, fmt, local_sizes, pieces
from ..rules.attention import sdpa_args
from ..rules.core import AttentionRole, LocalOp
from ..runtime import redistribute as rt
from .. import strategies
from ..strategies.base import AttentionCall, Site, shard_bytes, stamp
from .local_ops import SURGERIES, LocalContext
from .propagate import Propagation


@dataclass
class Lowered:
    """What the lowering did, for the plan report."""

    collectives: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, node, bytes/call)
    attention: list[tuple[str, str, str]] = field(default_factory=list)  # (node, kind, lowering)


class _Ctx:
    """What local-op surgeries see (``local_ops.LocalContext``): this rank, the axis, and actual
    placements in the graph being lowered; collectives they insert go to the plan report."""

    def __init__(self, axis: Axis, actual: dict[fx.Node, Any], collectives: list[tuple[str, str, int]]):
        self.rank, self.size, self.group = axis.rank, axis.n, axis.group
        self._actual, self._collectives = actual, collectives

    def placement(self, node: fx.Node) -> Any:
        return self._actual.get(node, REPLICATE)

    def record_collective(self, kind: str, node: fx.Node, nbytes: int) -> None:
        self._collectives.append((kind, node.name, int(nbytes)))


_nbytes = shard_bytes  # bytes of this rank's part of a global value under a placement


def _gather_layout(p: Shard, n: int) -> tuple[list[int], list[tuple[int, int, int]] | None]:
    """Per-rank lengths and, for multi-segment shards, the pieces' order: ``rt.gather``'s arguments."""
    sizes = local_sizes(p, n)
    if len(p.segments) == 1:
        return sizes, None
    order, off = [], 0
    for r in range(n):
        for start, length in pieces(p, n, r):
            order.append((off, length, start))
            off += length
    return sizes, order


def _after(graph: fx.Graph, x: fx.Node) -> Any:
    if x.op == "placeholder":
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        return graph.inserting_after(last)
    return graph.inserting_after(x)


class _Lowerer:
    def __init__(self, gm: fx.GraphModule, prop: Propagation, axis: Axis, traced: bool = False):
        self.gm, self.graph, self.prop, self.axis = gm, gm.graph, prop, axis
        self.traced = traced  # traced for autograd: collectives get their backward arguments
        self.actual: dict[fx.Node, Any] = dict(prop.placements)
        self.cache: dict[tuple[fx.Node, Any, fx.Node], fx.Node] = {}  # (value, placement, anchor)
        self.out = Lowered()
        self.ctx: LocalContext = _Ctx(axis, self.actual, self.out.collectives)

    # ------------------------------------------------------------------ redistribution
    def redistribute(self, x: fx.Node, want: Placement, user: fx.Node, at: fx.Node | None = None) -> fx.Node:
        """``x`` turned into placement ``want`` for ``user``, by collectives inserted after ``at``
        (default: right after ``x``; after the last write to ``x``'s storage before ``user``,
        see ``_anchor``). Copies are shared between users that read the same anchor."""
        have = self.actual.get(x, REPLICATE)
        if have == want:
            return x
        at = x if at is None else at
        key = (x, want, at)
        if key in self.cache:
            return self.cache[key]
        a = self.axis
        v = value(x)
        if isinstance(have, Partial):
            with _after(self.graph, at):
                node = self.graph.call_function(rt.all_reduce, (x, a.group))
            self._new(node, x, REPLICATE)
            self.out.collectives.append(("all_reduce", x.name, _nbytes(v, REPLICATE, a.n, a.rank)))
            return self._finish(key, self.redistribute(node, want, user) if want != REPLICATE else node)
        if isinstance(have, Shard):
            sizes, order = _gather_layout(have, a.n)
            with _after(self.graph, at):
                node = self.graph.call_function(rt.gather, (x, have.dim, sizes, a.group, order))
            self._new(node, x, REPLICATE)
            self.out.collectives.append(("all_gather", x.name, _nbytes(v, have, a.n, a.rank)))
            return self._finish(key, self.redistribute(node, want, user) if want != REPLICATE else node)
        if isinstance(have, Replicate) and isinstance(want, Shard):
            with _after(self.graph, at):
                # A rank holding none of the dim gets an empty slice (shard_slice needs a range).
                ranges = pieces(want, a.n, a.rank) or ((0, 0),)
                args: tuple[Any, ...] = (x, want.dim, ranges)
                if self.traced:  # the backward all-gathers the shard gradients
                    args += (a.group, *_gather_layout(want, a.n))
                node = self.graph.call_function(rt.shard_slice, args)
            self._new(node, x, want)
            return self._finish(key, node)
        raise ShardingError(
            f"node {user.name} ({user.target}) needs input {x.name} as {fmt(want)} but it is "
            f"{fmt(have)} on axis {a.name}; no redistribution turns one into the other"
        )

    def _new(self, node: fx.Node, like: fx.Node, placement: Any) -> None:
        self.actual[node] = placement
        v = value(like)
        if v is not None:
            node.meta["example_value"] = v  # global shape: rules only read global shapes

    def _finish(self, key: tuple[fx.Node, Any, fx.Node], node: fx.Node) -> fx.Node:
        self.cache[key] = node
        return node

    # ------------------------------------------------------------------ the walk
    def run(self) -> Lowered:
        nodes = list(self.graph.nodes)
        self.pos = {n: i for i, n in enumerate(nodes)}
        for ph, p in self.prop.seeds.items():
            self.actual[ph] = REPLICATE
            sliced = self.redistribute(ph, p, ph)
            ph.replace_all_uses_with(sliced, delete_user_cb=lambda u: u is not sliced)
        for buf, p in self.prop.fresh.items():  # made whole, then sliced before anything writes it
            self.actual[buf] = REPLICATE
            sliced = self.redistribute(buf, p, buf)
            buf.replace_all_uses_with(sliced, delete_user_cb=lambda u: u is not sliced)
        for node in nodes:
            d = self.prop.decisions.get(node)
            if d is None:
                continue
            for x, want in d.needs.items():
                x_now = self._current(node, x)
                if x_now is None:
                    continue
                r = self.redistribute(x_now, want, node, self._anchor(x, x_now, node))
                if r is not x_now:
                    node.replace_input_with(x_now, r)
            if node.op == "output":
                continue
            if node in self.prop.placements:
                self.actual[node] = d.out
            if d.attention is AttentionRole.SEQUENCE:
                self.lower_attention(node)
            elif d.local is not None:
                node = self.apply_local(node, d.local)
            elif d.attention is AttentionRole.LOCAL:
                self.keep_local(node)
            elif node.op == "call_function" and str(getattr(node.target, "__name__", "")) == "scaled_dot_product_attention":
                self.out.attention.append((node.name, self._kind(node), "replicated"))
            self._pin_sizes(node)
        for node in self.graph.nodes:
            node.meta.setdefault("xdit", {})[self.axis.name] = self.actual.get(node)
        return self.out

    def _anchor(self, x: fx.Node, x_now: fx.Node, user: fx.Node) -> fx.Node:
        """Where ``user``'s copy of ``x`` is made: after the last in-place write to ``x``'s alias
        group that precedes ``user`` (so the copy holds what ``user`` reads in eager), else right
        after ``x_now``. ``propagate`` refuses the plans where a later write would miss the copy.

            h = attn(..): S(1); h.clamp_(..); return h     gather(h) after clamp_, not after attn
        """
        before = [w for w in self.prop.group_writes.get(x, ()) if self.pos[w] < self.pos[user]]
        if before and self.pos[before[-1]] > self.pos[x]:
            return before[-1]
        return x_now

    def _current(self, user: fx.Node, x: fx.Node) -> fx.Node | None:
        """The node now feeding ``user`` in place of original input ``x``."""
        if x in user.all_input_nodes:
            return x
        for y in user.all_input_nodes:
            if self.actual.get(y) is not None and y.args and y.args[0] is x:
                return y
        return None

    def apply_local(self, node: fx.Node, op: LocalOp) -> fx.Node:
        """Perform the rule's local op on ``node`` with the surgery registered for its kind
        (``local_ops.SURGERIES``); a surgery that returns a new node replaces ``node``. Returns the
        node that now computes the value."""
        surgery = SURGERIES.get(op.kind)
        if surgery is None:
            raise ShardingError(
                f"node {node.name} ({node.target}) on axis {self.axis.name}: its rule asked for local op {op}, "
                f"but no surgery is registered for kind {op.kind!r} (known: {sorted(SURGERIES)}); add one to the "
                f"TABLE of its family in xdit_compile/passes/local_ops/"
            )
        new = surgery(self.graph, node, op, self.ctx)
        if new is None or new is node:
            return node
        new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})  # global shape, stage
        if "xdit" in node.meta:  # its own copy: the lowering writes this axis's placement into it
            new.meta["xdit"] = {**node.meta["xdit"], **new.meta.get("xdit", {})}
        self._replace(node, new, self.actual.get(node))
        return new

    def _replace(self, node: fx.Node, new: fx.Node, placement: Any) -> None:
        """``new`` takes ``node``'s place: its users, its placement, the needs of later decisions
        (users, the output too, still name ``node``), its position and its alias group's writes.
        ``node`` is erased unless ``new`` reads it."""
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        if not node.users:
            self.graph.erase_node(node)
        self.actual[new] = placement
        self.prop.placements[new] = placement
        for user, d in self.prop.decisions.items():
            if node in d.needs:  # Decisions are frozen: a renamed copy
                needs = {x: p for x, p in d.needs.items() if x is not node}
                needs[new] = d.needs[node]
                self.prop.decisions[user] = dataclasses.replace(d, needs=needs)
        self.pos[new] = self.pos[node]  # its copies still go after writes to its storage
        if node in self.prop.group_writes:
            self.prop.group_writes[new] = self.prop.group_writes[node]

    def _pin_sizes(self, node: fx.Node) -> None:
        """Sizes read off a sharded tensor must stay the global sizes."""
        v = value(node)
        if isinstance(v, torch.Tensor) or v is None:
            return
        if not any(isinstance(self.actual.get(x), Shard) for x in node.all_input_nodes):
            return
        if isinstance(v, (int, float, bool, torch.Size)) or (
            isinstance(v, tuple) and all(isinstance(i, int) for i in v)
        ):
            const = tuple(v) if isinstance(v, torch.Size) else v
            for user in list(node.users):
                user.args = map_arg(user.args, lambda a: const if a is node else a)
                user.kwargs = map_arg(user.kwargs, lambda a: const if a is node else a)

    # ------------------------------------------------------------------ attention
    def _kind(self, node: fx.Node) -> str:
        a = sdpa_args(node)
        pq = self.prop.placements.get(a["query"])
        pk = self.prop.placements.get(a["key"])
        if isinstance(pq, Shard) and pq.dim == len(shape(a["query"])) - 2:
            if isinstance(pk, Replicate):
                return "cross"
            return "joint" if len(pq.segments) > 1 else "self"
        if isinstance(pq, Shard):
            return "batched"
        return "self" if shape(a["query"])[-2] == shape(a["key"])[-2] else "cross"

    def lower_attention(self, node: fx.Node) -> None:
        """Sequence-sharded attention: the registry's first applicable strategy emits this rank's
        call (``strategies/``); the new node keeps the strategy's record in ``meta["xdit"]["strategy"]``."""
        a = sdpa_args(node)
        ax = self.axis
        q, k, v = a["query"], a["key"], a["value"]
        pq, pk = self.actual[q], self.actual[k]  # q, k may be slices of seeded inputs
        q_now, k_now, v_now = (self._current(node, t) or t for t in (q, k, v))
        heads, kv_heads = shape(q)[-3] if len(shape(q)) >= 3 else 1, shape(k)[-3] if len(shape(k)) >= 3 else 1
        site = Site(node.name, ax, heads, kv_heads, q=value(q), k=value(k), pq=pq, pk=pk)
        strategy, rejected = strategies.choose(site)
        mask = a.get("attn_mask")
        mask_now = self._current(node, mask) if isinstance(mask, fx.Node) else None
        call = AttentionCall(q_now, k_now, v_now, mask_now, a.get("scale"), bool(a.get("enable_gqa", False)))
        with self.graph.inserting_before(node):
            new, record = strategy.emit(self.graph, site, call)
        stamp(new, node, dataclasses.replace(record, rejected=rejected))
        self._replace(node, new, pq)
        kind = "joint" if len(pq.segments) > 1 or len(pk.segments) > 1 else "self"
        self.out.attention.append((node.name, kind, f"{strategy.name} ({record.why})"))
        for label, nbytes in strategy.report(site):
            self.out.collectives.append((label, node.name, nbytes))

    def keep_local(self, node: fx.Node) -> None:
        """Attention the rule keeps local: the call stays; the registry's ``local`` record goes on it."""
        a = sdpa_args(node)
        mask = a.get("attn_mask")
        call = AttentionCall(a["query"], a["key"], a["value"], mask if isinstance(mask, fx.Node) else None,
                             a.get("scale"), bool(a.get("enable_gqa", False)))
        local = strategies.get("local")
        record = local.record(call)  # type: ignore[attr-defined]
        stamp(node, node, record)
        self.out.attention.append((node.name, self._kind(node), f"{local.name} ({record.why})"))


def lower(gm: fx.GraphModule, prop: Propagation, axis: Axis) -> Lowered:
    """Rewrite ``gm`` in place into this rank's program for ``axis``; see the module docstring.

    A graph traced for autograd (``gradients.traced_for_autograd``) also gets the gradient
    plumbing of ``runtime/autograd.py``: ``xdit_slice`` nodes carry what their backward
    all-gathers with, and ``xdit_grad_sync`` nodes complete the gradients of replicated values
    read next to per-rank data (``insert_grad_syncs``).
    """
    traced = traced_for_autograd(gm)
    lowerer = _Lowerer(gm, prop, axis, traced)
    out = lowerer.run()
    if traced:
        insert_grad_syncs(gm.graph, lowerer.actual, axis)
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return out
