"""How one tensor lives across one mesh axis: ``Replicate``, ``Shard`` and ``Partial``.

A ``Shard`` generalises DTensor's ``Shard(dim)`` so that sequence parallelism survives the
reshapes and concatenations DiTs perform on their token dimension:

* the global dimension is the concatenation of *segments* (``cat([text, image])`` gives two);
* every segment is ``units * inner`` elements, and ranks split the *units* in contiguous
  chunks (``inner`` is what a flatten merged in after the sharded dim, e.g. image columns);
* a rank's local tensor is the concatenation, in segment order, of its chunk of each segment.

Chunks may be uneven: with ``U`` units over ``n`` ranks, rank ``i`` gets ``U // n`` units plus
one if ``i < U % n`` (the same split as ``torch.tensor_split``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Union


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the full tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a summand; the full tensor is the sum over the axis."""

    def __str__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Shard:
    """Dimension ``dim`` is split across the ranks of the axis (see the module docstring)."""

    dim: int
    segments: tuple[int, ...]
    inner: int = 1

    @property
    def length(self) -> int:
        """Global length of the sharded dimension."""
        return sum(self.segments) * self.inner

    def with_dim(self, dim: int) -> "Shard":
        return Shard(dim, self.segments, self.inner)

    def __str__(self) -> str:
        if len(self.segments) == 1 and self.inner == 1:
            return f"S({self.dim})"
        seg = "+".join(str(s) for s in self.segments)
        return f"S({self.dim}:{seg}" + (f"x{self.inner})" if self.inner != 1 else ")")


Placement = Union[Replicate, Shard, Partial]
REPLICATE = Replicate()
PARTIAL = Partial()


def shard(dim: int, length: int) -> Shard:
    """The plain contiguous shard of a dimension of ``length`` elements."""
    return Shard(dim, (length,), 1)


def chunk_bounds(units: int, n: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s units when ``units`` are split over ``n`` ranks."""
    base, extra = divmod(units, n)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@lru_cache(maxsize=4096)
def pieces(p: Shard, n: int, rank: int) -> tuple[tuple[int, int], ...]:
    """Global ``(start, length)`` ranges, in local order, that ``rank`` holds of ``p.dim``."""
    out: list[tuple[int, int]] = []
    offset = 0
    for units in p.segments:
        lo, hi = chunk_bounds(units, n, rank)
        if hi > lo:
            out.append((offset + lo * p.inner, (hi - lo) * p.inner))
        offset += units * p.inner
    return tuple(out)


def same_layout(a: Placement, b: Placement, n: int) -> bool:
    """Whether two placements put the same global ranges on every one of ``n`` ranks.

    ``Shard(2, (8,), inner=2)`` (rows merged from 8 pairs) and ``Shard(2, (16,))`` hold the same
    rows on 2 ranks, so values in the two layouts line up without moving anything.
    """
    if a == b:
        return True
    if not (isinstance(a, Shard) and isinstance(b, Shard)) or a.dim != b.dim:
        return False
    return all(pieces(a, n, r) == pieces(b, n, r) for r in range(n))


def local_length(p: Shard, n: int, rank: int) -> int:
    """Length of the sharded dimension on ``rank``."""
    return sum(length for _, length in pieces(p, n, rank))


def local_sizes(p: Shard, n: int) -> list[int]:
    """Per-rank lengths of the sharded dimension, in rank order."""
    return [local_length(p, n, r) for r in range(n)]


def is_even(p: Shard, n: int) -> bool:
    """Whether every rank holds the same length (needed where collectives want equal sizes)."""
    return all(u % n == 0 for u in p.segments)


def global_order(p: Shard, n: int) -> list[int]:
    """Global index of each position of the rank-ordered concatenation of all local shards."""
    order: list[int] = []
    for r in range(n):
        for start, length in pieces(p, n, r):
            order.extend(range(start, start + length))
    return order


def local_shape(shape: tuple[int, ...], p: Placement, n: int, rank: int) -> tuple[int, ...]:
    """Shape of ``rank``'s local tensor for a global ``shape`` under placement ``p``."""
    if not isinstance(p, Shard):
        return tuple(shape)
    out = list(shape)
    out[p.dim] = local_length(p, n, rank)
    return tuple(out)


def fmt(p: object) -> str:
    """Compact text of a placement or a (nested) tuple of them, for reports and errors."""
    if isinstance(p, tuple):
        return "(" + ", ".join(fmt(x) for x in p) + ")"
    return "-" if p is None else str(p)
