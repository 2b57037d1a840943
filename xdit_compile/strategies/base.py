"""What every attention strategy shares: the site it lowers, its cost, and the record it leaves.

A *strategy* turns one scaled-dot-product attention whose tokens are sharded on a mesh axis
into the node(s) of the per-rank program (``emit``), says whether it applies there and why not
(``why_not``), why it was picked (``why``, for the plan report) and what it moves (``cost`` for
the plan search, ``report`` for the lowered collectives). ``registry.py`` lists them in order.

The node a strategy emits carries an ``AttentionRecord`` in ``node.meta["xdit"]["strategy"]``:
the q/k/v/mask/scale arguments and the shard layout in typed fields, so later passes
(PipeFusion's stale K/V) re-lower it from the record instead of parsing the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ..axis import Axis
from ..placements import Placement, Shard, pieces
from ..runtime import redistribute as rt

STRATEGY = "strategy"  # key in node.meta["xdit"]


@dataclass(frozen=True)
class Site:
    """One attention over tokens sharded on ``axis``, as a strategy sees it.

    ``q``/``k``: global example values (shapes, dtype), ``pq``/``pk``: their placements on the
    axis (``None`` while the plan search costs a site it has not placed yet), ``q_bytes`` /
    ``k_bytes``: global sizes in bytes as the plan search counts them.
    """

    node: str
    axis: Axis
    heads: int
    kv_heads: int
    q_bytes: float = 0.0
    k_bytes: float = 0.0
    q: Any = None
    k: Any = None
    pq: Placement | None = None
    pk: Placement | None = None

    @property
    def heads_divide_ulysses(self) -> bool:
        u = self.axis.ulysses
        return self.heads % u == 0 and self.kv_heads % u == 0

    def heads_text(self) -> str:
        return f"{self.heads} heads ({self.kv_heads} kv) do not divide ulysses={self.axis.ulysses}"


@dataclass(frozen=True)
class AttentionCall:
    """The arguments of one attention call in the graph being lowered."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None = None
    scale: float | None = None
    enable_gqa: bool = False


@dataclass(frozen=True)
class AttentionRecord:
    """``node.meta["xdit"]["strategy"]`` of an emitted attention node.

    ``call``: the node's q/k/v, the mask as the node reads it, scale and GQA flag.
    ``mask_source``: that mask before ``align_mask`` (rows and columns in global token order),
    ``q_index``: the global token of each query row the node sees. ``q_sizes``/``kv_sizes``:
    per-rank token lengths on the axis; ``kv_placement``: the keys' placement.
    ``ulysses_group``: the group heads are traded over (``None``: none);
    ``ring_group``: the group K/V travel over (``None``: none).
    """

    strategy: str
    call: AttentionCall
    why: str = ""
    mask_source: fx.Node | None = None
    q_index: tuple[int, ...] | None = None
    q_sizes: tuple[int, ...] | None = None
    kv_sizes: tuple[int, ...] | None = None
    kv_placement: Placement | None = None
    ulysses_group: str | None = None
    ring_group: str | None = None
    rejected: tuple[tuple[str, str], ...] = ()  # (strategy, why not) of those tried first


def record_of(node: fx.Node) -> AttentionRecord | None:
    """The strategy record of an emitted attention node, if any."""
    rec = node.meta.get("xdit", {}).get(STRATEGY)
    return rec if isinstance(rec, AttentionRecord) else None


def stamp(new: fx.Node, old: fx.Node, record: AttentionRecord) -> None:
    """``new`` takes ``old``'s meta plus ``record``. The ``xdit`` dict is copied: graph copies share
    meta dicts (``copy.copy`` of ``node.meta``), and the record belongs to this graph only."""
    if new is not old:
        new.meta.update(old.meta)
    new.meta["xdit"] = {**old.meta.get("xdit", {}), STRATEGY: record}


@dataclass(frozen=True)
class Cost:
    """What one attention call makes a rank receive: bytes by collective kind, and the number of
    collectives (each costs a fixed latency in the plan search)."""

    bytes: Mapping[str, float] = field(default_factory=dict)
    collectives: int = 0

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))


def shard_bytes(v: Any, p: Any, n: int, rank: int) -> int:
    """Bytes of this rank's part of ``v`` (global value) under placement ``p``."""
    if not isinstance(v, torch.Tensor):
        return 0
    numel = v.numel()
    if isinstance(p, Shard):
        numel = numel // max(p.length, 1) * sum(length for _, length in pieces(p, n, rank))
    return int(numel * v.element_size())


class Strategy:
    """Base of an attention strategy; see the module docstring. Subclasses set ``name`` and
    override what differs. ``auto``: ``lower`` may pick it for sequence-sharded attention
    (PipeFusion's strategies are picked by PipeFusion only)."""

    name: str = ""
    auto: bool = True

    def why_not(self, site: Site) -> str | None:
        """``None`` when the strategy applies to ``site``, else the reason it does not."""
        return None

    def why(self, site: Site) -> str:
        """Why it was picked, for the plan report."""
        return self.name

    def cost(self, site: Site) -> Cost:
        return Cost()

    def report(self, site: Site) -> list[tuple[str, int]]:
        """The collectives one call issues, as the plan report lists them: (label, bytes per call)."""
        return []

    def emit(self, graph: fx.Graph, site: Site, call: AttentionCall) -> tuple[fx.Node, AttentionRecord]:
        """Insert this rank's attention (at the graph's insertion point); return it and its record."""
        raise NotImplementedError(f"strategy {self.name} emits no sequence-parallel attention")


def emit_call(graph: fx.Graph, fn: Callable[..., Any], call: AttentionCall, kwargs: dict[str, Any],
              q_index: Sequence[int] | None, k_order: Sequence[int] | None) -> fx.Node:
    """``fn(q, k, v, scale=, enable_gqa=, **kwargs, mask=)`` with the mask's rows put in the order
    of ``q_index`` and its columns in ``k_order`` (``None``: as they are)."""
    kw: dict[str, Any] = {"scale": call.scale, "enable_gqa": call.enable_gqa, **kwargs}
    if call.mask is not None:
        kw["mask"] = graph.call_function(rt.align_mask, (call.mask, q_index, k_order))
    return graph.call_function(fn, (call.query, call.key, call.value), kw)


def mask_of(node: fx.Node) -> fx.Node | None:
    m = node.kwargs.get("mask")
    return m if isinstance(m, fx.Node) else None
