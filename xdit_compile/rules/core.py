"""What a sharding rule sees (``OpView``) and returns (``Decision``), plus shared helpers.

A rule is a function ``rule(op: OpView) -> Decision | None`` registered for a list of op
names in the table of its op family. Rules are written for one mesh axis of ``op.n`` ranks.
Returning ``None`` means "no opinion": the propagation then replicates the op (always correct)
and records the reason. A ``Decision`` is data: when this rank must run something other than
the global op (local sizes, a halo exchange), the rule names it with a ``LocalOp`` and the
lowering performs the surgery registered for its kind (``passes/local_ops/``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch.fx as fx

from ..graph import arg, is_tensor, shape, value
from ..placements import REPLICATE, Placement, Replicate, Shard, pieces, same_layout


class AttentionRole(str, Enum):
    """How the lowering treats an attention node the rule placed (``Decision.attention``). A ``str``
    enum, so code that still compares with "sequence" / "local" keeps working."""

    SEQUENCE = "sequence"  # sequence-sharded queries and keys: the strategy registry lowers it
    LOCAL = "local"  # every rank attends its own rows with what it holds: the call stays


# Constants a ``LocalOp`` may carry: what can be compared, hashed and printed without a graph.
_CONSTANTS = (int, float, bool, str, type(None))


def _is_constant(v: Any) -> bool:
    if isinstance(v, tuple):
        return all(_is_constant(x) for x in v)
    return isinstance(v, _CONSTANTS)


@dataclass(frozen=True)
class LocalOp:
    """What this rank computes in place of the global op: a ``kind`` and its constant parameters.

    Data only (no nodes, no callables), so a plan can be compared, logged and tested without
    running it. The lowering performs it with the surgery registered for ``kind``
    (``passes/local_ops/``); what depends on the rank (local sizes, offsets) is computed there::

        LocalOp("conv_halo", (("dim", 2), ("before", 1), ("after", 1), ("padding", (0, 1))))
        str(...) == "conv_halo(dim=2, before=1, after=1, padding=(0, 1))"
    """

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        bad = [k for k, v in self.params if not isinstance(k, str) or not _is_constant(v)]
        if not self.kind or bad:
            raise TypeError(
                f"LocalOp {self.kind!r}: parameters {bad} are not constants (ints, floats, bools, strings, None "
                f"or tuples of them); pass the numbers the surgery needs, not nodes or functions"
            )

    def __getitem__(self, name: str) -> Any:
        for k, v in self.params:
            if k == name:
                return v
        raise KeyError(f"LocalOp {self} has no parameter {name!r}")

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{k}={v!r}' for k, v in self.params)})"


def local_op(kind: str, **params: Any) -> LocalOp:
    """``LocalOp(kind, params)`` written with keyword arguments (kept in the order given)."""
    return LocalOp(kind, tuple(params.items()))


@dataclass(frozen=True)
class Comm:
    """Communication a local op issues itself (halo exchanges, statistics), for the cost model:
    the number of collectives and the bytes a rank receives."""

    collectives: int = 0
    nbytes: float = 0.0


NO_COMM = Comm()


@dataclass(frozen=True)
class Decision:
    """Output placement(s) of a node, the placements it needs its tensor inputs in, and what the
    lowering does with it: data only, so two propagations of one graph give equal decisions.

    ``local``: the op this rank runs instead of the global one (``None``: the node as it is);
    ``attention``: how an attention node is lowered; ``note``: why the op runs replicated, for
    the plan report; ``comm``: collectives ``local`` issues beyond the redistributions of ``needs``.
    """

    out: Any  # a Placement, or a (nested) tuple of them for multi-output ops, or None
    needs: dict[fx.Node, Placement] = field(default_factory=dict)
    local: LocalOp | None = None
    note: str | None = None
    attention: AttentionRole | None = None
    comm: Comm = NO_COMM


class OpView:
    """A node, the placements of its inputs on one axis, and the axis size."""

    def __init__(self, node: fx.Node, placements: dict[fx.Node, Any], n: int, name: str):
        self.node = node
        self.name = name
        self.n = n
        self._pl = placements

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        return arg(self.node, index, name, default)

    def pl(self, x: Any) -> Any:
        """Placement of an input (``R`` for non-nodes and unknown values)."""
        if isinstance(x, fx.Node):
            return self._pl.get(x, REPLICATE)
        return REPLICATE

    def tensor_inputs(self) -> list[fx.Node]:
        seen: dict[fx.Node, None] = {}
        for x in self.node.all_input_nodes:
            if is_tensor(x):
                seen[x] = None
        return list(seen)

    @property
    def out_value(self) -> Any:
        return value(self.node)

    @property
    def out_ndim(self) -> int:
        return len(value(self.node).shape)


ShardRule = Callable[[OpView, fx.Node, Shard, "dict[fx.Node, Placement]"], "Decision | None"]


def on_first_shard(fn: ShardRule) -> Callable[[OpView], "Decision | None"]:
    """Write a rule about the shard of the op's first input; the wrapper does the rest.

    A replicated first input gives ``R``, and a first input that is neither replicated nor
    sharded (a ``Partial``) has no rule. ``fn(op, x, p, others)`` gets the input, its shard,
    and ``others``: every other tensor input (weights, biases, indices) asked replicated.
    """

    @functools.wraps(fn)
    def rule(op: OpView) -> Decision | None:
        x = op.node.args[0]
        p = op.pl(x)
        others = {t: REPLICATE for t in op.tensor_inputs() if t is not x and not isinstance(op.pl(t), Replicate)}
        if isinstance(p, Replicate):
            return Decision(REPLICATE, others)
        if not isinstance(p, Shard):
            return None
        return fn(op, x, p, others)

    return rule



def replicate_all(op: OpView, note: str | None = None) -> Decision:
    """Run the op on full tensors: every input gathered (or all-reduced) to ``R``."""
    needs = {x: REPLICATE for x in op.tensor_inputs() if not isinstance(op.pl(x), Replicate)}
    out = _replicated_like(op.out_value)
    return Decision(out, needs, note=note if needs else None)


def _replicated_like(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return tuple(_replicated_like(x) for x in v)
    return REPLICATE if hasattr(v, "shape") else None



def regroup(p: Shard, inner: int, n: int) -> Shard | None:
    """The same distribution expressed with unit size ``inner``, if one exists.

    A segment of ``U`` units of ``k`` elements splits like ``U*k/inner`` units of ``inner``
    elements only when both splits are even (then both cut every ``U*k/n`` elements).
    """
    if inner == p.inner:
        return p
    segs = []
    for u in p.segments:
        total = u * p.inner
        if total % inner or u % n or (total // inner) % n:
            return None
        segs.append(total // inner)
    return Shard(p.dim, tuple(segs), inner)



def split_segments(p: Shard, bounds: list[int]) -> list[Shard] | None:
    """Split ``p`` at global element offsets ``bounds`` (must fall on segment boundaries)."""
    edges = [0]
    for u in p.segments:
        edges.append(edges[-1] + u * p.inner)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo not in edges or hi not in edges:
            return None
        a, b = edges.index(lo), edges.index(hi)
        if b <= a:
            return None
        out.append(Shard(p.dim, p.segments[a:b], p.inner))
    return out


def local_range(p: Shard, n: int, rank: int, lo: int, hi: int) -> tuple[int, int]:
    """Local ``[start, stop)`` on ``rank`` of the segments spanning global ``[lo, hi)``."""
    start = stop = 0
    offset = 0
    for u in p.segments:
        seg_len = u * p.inner
        mine = sum(length for s, length in pieces(Shard(p.dim, (u,), p.inner), n, rank))
        if offset + seg_len <= lo:
            start += mine
        if offset + seg_len <= hi:
            stop += mine
        offset += seg_len
    return start, stop




def align_to(op: OpView, inputs: list[fx.Node], target: Shard, out_ndim: int) -> dict[fx.Node, Placement] | None:
    """Placements that make every broadcast input agree with output shard ``target``.

    Inputs of size 1 on the target dim stay replicated; replicated inputs of full size are
    sliced (free); inputs sharded differently are gathered then sliced. ``None`` if impossible.
    """
    needs: dict[fx.Node, Placement] = {}
    for x in inputs:
        s = shape(x)
        d = target.dim - (out_ndim - len(s))
        p = op.pl(x)
        if d < 0 or s[d] == 1:
            if not isinstance(p, Replicate):
                needs[x] = REPLICATE
            continue
        want = target.with_dim(d)
        if s[d] != target.length:
            return None
        if not same_layout(p, want, op.n):
            needs[x] = want
    return needs
