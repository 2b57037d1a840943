"""Traceable collectives with explicit (possibly uneven) sizes.

Everything here goes through ``torch.distributed._functional_collectives`` so that Dynamo,
``make_fx`` and inductor see the collectives as graph nodes; every function returns a plain,
already-waited tensor (never an ``AsyncCollectiveTensor``), so callers may treat results like
any other tensor. ``group`` is a process group or its ``group_name``.

Sizes are plain Python ints known on every rank (sequence shards of a plan), so the code
branches only on them, never on tensor values.

``record_collectives()`` logs what eager calls hand to the network; see its docstring.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d

from xdit_compile.context import current
from xdit_compile.errors import CollectiveError

__all__ = [
    "CollectiveRecord",
    "Group",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "group_rank",
    "group_size",
    "record_collectives",
    "shift",
    "wait",
]

Group = str | dist.ProcessGroup
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Groups


def group_size(group: Group) -> int:
    """Number of ranks in ``group``; constant-folded when traced by Dynamo."""
    return c10d._get_group_size_by_name(group)


@torch.compiler.assume_constant_result
def _rank_in_named_group(group_name: str) -> int:
    # Dynamo cannot trace the C++ name -> group lookup; a group's rank never changes, so it is
    # safe to evaluate this once at trace time and bake the answer into the graph.
    return dist.get_rank(c10d._resolve_process_group(group_name))


def group_rank(group: Group) -> int:
    """This process's rank inside ``group`` (its position in the group's rank order)."""
    if isinstance(group, str):
        return _rank_in_named_group(group)
    return dist.get_rank(group)


# --------------------------------------------------------------------------------------------
# Recording


class CollectiveRecord(NamedTuple):
    """One eager collective call: its kind, the bytes this rank handed over, the group size.

    A NamedTuple rather than a dataclass so that records compare equal to plain
    ``(kind, nbytes, group_size)`` tuples in tests and benchmark tables.
    """

    kind: str
    nbytes: int
    group_size: int


@contextlib.contextmanager
def record_collectives() -> Iterator[list[CollectiveRecord]]:
    """Log every collective issued by this module while the block runs.

    Each call appends ``CollectiveRecord(kind, nbytes, group_size)`` where ``nbytes`` is the
    size of the buffer this rank hands to the collective (padding included, since padding is
    sent too), not the wire traffic of a particular algorithm. Kinds: ``"all_gather"``,
    ``"all_to_all"``, ``"all_reduce"``, ``"shift"``.

    Only eager calls are seen: inside code compiled by ``torch.compile`` the Python bodies run
    once at trace time, and recording is switched off there so tracing stays side-effect free.
    Nested recorders each receive every record.
    """
    with log_into(current().collective_logs) as log:
        yield log


@contextlib.contextmanager
def log_into(active: list[list[T]]) -> Iterator[list[T]]:
    """A fresh list that ``active`` holds while the block runs (recorders append to all of them)."""
    log: list[T] = []
    active.append(log)
    try:
        yield log
    finally:
        active.remove(log)


def _record(kind: str, sent: torch.Tensor, size: int) -> None:
    active = current().collective_logs
    if torch.compiler.is_compiling() or not active or funcol._are_we_tracing():
        return
    record = CollectiveRecord(kind, sent.numel() * sent.element_size(), size)
    for log in active:
        log.append(record)


# --------------------------------------------------------------------------------------------
# Helpers


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    # Eager functional collectives return a lazily-waited subclass; callers get plain tensors.
    if isinstance(tensor, funcol.AsyncCollectiveTensor):
        return tensor.wait()
    return tensor


def _check_sizes(fn: str, what: str, sizes: Sequence[int], size: int, x: torch.Tensor) -> None:
    if len(sizes) != size:
        raise CollectiveError(
            f"{fn}: {what} has {len(sizes)} entries but the group has {size} ranks "
            f"(input shape {tuple(x.shape)}); pass one length per group rank."
        )
    if any(int(s) < 0 for s in sizes):
        raise CollectiveError(f"{fn}: {what}={list(sizes)} contains a negative length.")


def _dim(fn: str, x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise CollectiveError(f"{fn}: dim {dim} is out of range for shape {tuple(x.shape)}.")
    return dim % x.dim()


# --------------------------------------------------------------------------------------------
# Collectives


def all_gather(x: torch.Tensor, dim: int, sizes: Sequence[int], group: Group) -> torch.Tensor:
    """Concatenate every group rank's ``x`` along ``dim``, in group-rank order.

    ``sizes[i]`` is rank i's length along ``dim`` (this rank's must match ``x``); all other
    dims must agree across ranks. Uneven sizes are padded to the largest, gathered, and the
    padding is dropped again.
    """
    fn = "all_gather"
    size, me, dim = group_size(group), group_rank(group), _dim(fn, x, dim)
    _check_sizes(fn, "sizes", sizes, size, x)
    if x.size(dim) != sizes[me]:
        raise CollectiveError(
            f"{fn}: this rank (group rank {me} of {size}) holds {x.size(dim)} along dim {dim} "
            f"(shape {tuple(x.shape)}) but sizes[{me}] = {sizes[me]}; sizes must describe the "
            "actual shards."
        )
    longest = max(sizes)
    send = x
    if x.size(dim) < longest:
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.size(dim)
        send = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    send = send.contiguous()
    _record(fn, send, size)
    # Gathering along a new leading dim keeps the collective a single contiguous buffer.
    stacked = _waited(funcol.all_gather_single(send, 0, group)).view(size, *send.shape)
    if all(s == longest for s in sizes):
        return stacked.movedim(0, dim).flatten(dim, dim + 1)
    return torch.cat([stacked[i].narrow(dim, 0, sizes[i]) for i in range(size)], dim=dim)


def all_to_all(
    x: torch.Tensor,
    scatter_dim: int,
    gather_dim: int,
    group: Group,
    scatter_sizes: Sequence[int] | None = None,
    gather_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` over the group and concatenate what arrives along
    ``gather_dim``.

    Piece j of ``scatter_dim`` goes to group rank j; pieces received are concatenated along
    ``gather_dim`` in source-rank order. Both size lists are global (the same on every rank):

    * ``scatter_sizes[j]``: the length along ``scatter_dim`` that every rank sends to rank j
      (so it sums to ``x.size(scatter_dim)``); ``None`` splits evenly, which needs
      ``x.size(scatter_dim)`` divisible by the group size.
    * ``gather_sizes[j]``: rank j's length along ``gather_dim``; ``None`` means every rank has
      this rank's length.

    Ulysses, out and back (N ranks, shard lengths ``s``)::

        q_BHsD -> all_to_all(q, 1, 2, g, gather_sizes=s)      -> [B, H/N, sum(s), D]
        o_BhSD -> all_to_all(o, 2, 1, g, scatter_sizes=s)     -> [B, H, s[rank], D]
    """
    fn = "all_to_all"
    size, me = group_size(group), group_rank(group)
    scatter_dim, gather_dim = _dim(fn, x, scatter_dim), _dim(fn, x, gather_dim)
    if scatter_dim == gather_dim:
        raise CollectiveError(
            f"{fn}: scatter_dim and gather_dim are both {scatter_dim} (shape {tuple(x.shape)}); "
            "use all_gather or a slice instead."
        )
    if scatter_sizes is None:
        if x.size(scatter_dim) % size != 0:
            raise CollectiveError(
                f"{fn}: x.size({scatter_dim}) = {x.size(scatter_dim)} (shape {tuple(x.shape)}) is "
                f"not divisible by the group size {size}; pass scatter_sizes for an uneven split "
                "or choose a parallel degree that divides this dim."
            )
        scatter_sizes = [x.size(scatter_dim) // size] * size
    _check_sizes(fn, "scatter_sizes", scatter_sizes, size, x)
    if sum(scatter_sizes) != x.size(scatter_dim):
        raise CollectiveError(
            f"{fn}: scatter_sizes={list(scatter_sizes)} sums to {sum(scatter_sizes)} but "
            f"x.size({scatter_dim}) = {x.size(scatter_dim)} (shape {tuple(x.shape)})."
        )
    if gather_sizes is None:
        gather_sizes = [x.size(gather_dim)] * size
    _check_sizes(fn, "gather_sizes", gather_sizes, size, x)
    if gather_sizes[me] != x.size(gather_dim):
        raise CollectiveError(
            f"{fn}: this rank (group rank {me} of {size}) holds {x.size(gather_dim)} along "
            f"gather_dim {gather_dim} (shape {tuple(x.shape)}) but gather_sizes[{me}] = "
            f"{gather_sizes[me]}."
        )

    # Scatter pieces must be contiguous runs of memory: put scatter_dim first, flatten, and
    # express every split in elements, since pieces from different ranks differ in shape.
    send = x.movedim(scatter_dim, 0).contiguous()
    row = math.prod(send.shape[1:])
    received_shapes = []
    for j in range(size):
        shape = list(x.shape)
        shape[scatter_dim] = scatter_sizes[me]
        shape[gather_dim] = gather_sizes[j]
        received_shapes.append(shape)
    input_splits = [scatter_sizes[j] * row for j in range(size)]
    output_splits = [math.prod(shape) for shape in received_shapes]
    _record(fn, send, size)
    flat = _waited(funcol.all_to_all_single(send.view(-1), output_splits, input_splits, group))
    pieces = []
    offset = 0
    for shape, numel in zip(received_shapes, output_splits):
        moved = [shape[scatter_dim]] + [n for d, n in enumerate(shape) if d != scatter_dim]
        pieces.append(flat.narrow(0, offset, numel).view(moved).movedim(0, scatter_dim))
        offset += numel
    return torch.cat(pieces, dim=gather_dim)


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of ``x`` over the group, on every rank."""
    size = group_size(group)
    send = x.contiguous()
    _record("all_reduce", send, size)
    return _waited(funcol.all_reduce(send, "sum", group))


def wait(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor of a collective started with ``wait=False`` (a no-op for plain tensors)."""
    return _waited(x)


def shift(x: torch.Tensor, offset: int, group: Group, wait: bool = True) -> torch.Tensor:
    """Ring pass: group rank i receives the ``x`` of group rank ``(i - offset) mod N``.

    ``wait=False`` returns as soon as the pass is issued (eagerly, a lazily-waited tensor the
    network fills in the background): pass the result to :func:`wait` before reading it, and
    compute in between to overlap the two (Ring attention's double buffering).

    Every rank's ``x`` must have the same shape and dtype. Implemented as an
    ``all_to_all_single`` in which each rank sends its whole buffer to one peer and zero
    elements to all others, so it stays one traceable functional collective (the
    ``permute_tensor`` helper resolves groups in a way Dynamo cannot trace).
    """
    size = group_size(group)
    if offset % size == 0:
        return x.clone()
    me = group_rank(group)
    send = x.contiguous()
    input_splits = [0] * size
    output_splits = [0] * size
    input_splits[(me + offset) % size] = send.numel()
    output_splits[(me - offset) % size] = send.numel()
    _record("shift", send, size)
    flat = funcol.all_to_all_single(send.view(-1), output_splits, input_splits, group)
    return _waited(flat).view(x.shape) if wait else flat.view(x.shape)
