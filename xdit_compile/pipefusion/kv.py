"""Per-layer K/V buffers, the step/stream state that decides when they are fresh, and the two
attention ops the PipeFusion programs call.

* ``fill_kv_attention`` (full-sequence calls: warmup steps): exact attention; stores the
  layer's whole K/V into the current stream's buffer.
* ``stale_kv_attention`` (patch calls): writes the patch's fresh K/V into the buffer at its
  global token positions and attends over the whole buffer, so the patch sees fresh K/V for
  itself and the patches before it in this step, and the previous step's K/V for the rest.

Both take the sequence-parallel groups of the stage (``None`` when absent), so one op covers
PipeFusion alone, x Ulysses, x Ring and x USP. With R ring ranks of U Ulysses ranks each
(sp rank ``ring_rank * U + ulysses_rank``)::

    q, k, v  [B, H, s_r, D]            this rank's tokens (of the patch, or of the sequence)
    -> Ulysses all-to-all (U > 1)      [B, H/U, sum of this ring rank's U shards, D]
    -> K/V all-gather over the ring    k, v: every sp rank's tokens, in sp-rank order
    -> write k, v into the buffer at ``pieces`` (global positions); attend q over
       the gathered K/V (fill) or over the whole buffer (stale)
    -> Ulysses all-to-all back         [B, H, s_r, D]

So the buffer always holds the *whole* sequence (this rank's head slice with Ulysses): each
ring rank sees every patch, and the ring moves only the current patch's K/V (an all-gather,
not a circulating ring), at the price of not dividing the buffer's memory by R.

Both are ``torch.library`` custom ops (opaque to inductor, traceable by Dynamo and
FakeTensor); the buffers live in the ``KVStore`` the driver makes current around each call.
They attend with the local kernel of ``runtime/kernels.py``, as the core's Ulysses / Ring / USP do.

**Steps and streams.** A *step* is recognised by the values of the caller's small tensor
inputs (``numel <= batch``: the timestep, guidance, ...): a call whose values differ from the
previous call's starts a new step; a call with the same values is another *stream* of the
same step (true CFG calls the transformer for the conditional, then the unconditional half)
and gets its own buffers. A new *generation* starts on ``reset()``, when the values go up
(timestep schedules count down) or repeat an earlier step of this generation. The first
``warmup_steps`` steps of a generation, and any call of a stream whose buffers are not filled
yet, run the full sequence synchronously. Graphs without such inputs count each call as a
step (then two calls per step would mix their K/V: pass ``num_pipeline_patch=1`` there).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..context import current as context
from ..runtime.attention import _mask_heads, _ulysses_scatter_heads
from ..runtime.collectives import all_gather, all_to_all, group_rank, group_size
from ..runtime.kernels import local_attention

_TOKENS = 2  # the token dim of q/k/v [B, H, S, D]


def reset() -> None:
    """Start a new generation on the next call of every PipeFusion-compiled graph."""
    context().kv_epoch += 1


@dataclass
class KVStore:
    """K/V buffers of one compiled graph on one rank, per (stream, layer)."""

    buffers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stream: int = 0

    def put(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep ``k``/``v`` (fresh tensors the store then owns) as the layer's buffer."""
        self.buffers[(self.stream, layer)] = (k, v)

    def get(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.buffers[(self.stream, layer)]
        except KeyError:
            raise RuntimeError(f"pipefusion: no K/V for layer {layer} stream {self.stream}: a patch step ran "
                               "before a full-sequence step filled the buffers") from None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.buffers.values() for t in kv)

    @contextlib.contextmanager
    def current(self, stream: int) -> Iterator[None]:
        self.stream = stream
        stores = context().kv_stores  # the running program's store, for the attention ops
        stores.append(self)
        try:
            yield
        finally:
            stores.pop()


def _store() -> KVStore:
    stores = context().kv_stores
    if not stores:
        raise RuntimeError("pipefusion attention ops run only inside a PipeFusion pipeline call")
    return stores[-1]


def _write(kb: torch.Tensor, vb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: list[int]) -> None:
    """Copy ``k``/``v`` (pieces concatenated) into the buffers at their global positions.

    ``pieces`` = flattened ``(global start, length)`` pairs, in the order of ``k``'s tokens.
    """
    off = 0
    for start, length in zip(pieces[0::2], pieces[1::2]):
        kb.narrow(_TOKENS, start, length).copy_(k.narrow(_TOKENS, off, length))
        vb.narrow(_TOKENS, start, length).copy_(v.narrow(_TOKENS, off, length))
        off += length


class _Sp:
    """The stage's sequence-parallel groups as one call sees them (sizes, this rank's chunk)."""

    def __init__(self, ulysses_group: Optional[str], ring_group: Optional[str]):
        self.ug, self.rg = ulysses_group, ring_group
        self.u = group_size(ulysses_group) if ulysses_group is not None else 1
        self.r = group_size(ring_group) if ring_group is not None else 1
        self.u_index = group_rank(ulysses_group) if ulysses_group is not None else 0
        j = group_rank(ring_group) if ring_group is not None else 0
        self.chunk = slice(j * self.u, (j + 1) * self.u)  # this ring rank's U shards of the sizes

    def gather(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sizes: list[int],
               kv_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q: this ring rank's queries (head slice); k, v: every sp rank's tokens in sp-rank order."""
        if self.ug is not None:
            q, k, v = _ulysses_scatter_heads(q, k, v, self.ug, q_sizes[self.chunk], kv_sizes[self.chunk])
        if self.rg is not None:
            sizes = [sum(kv_sizes[r * self.u:(r + 1) * self.u]) for r in range(self.r)]
            k, v = all_gather(torch.stack([k, v]), _TOKENS + 1, sizes, self.rg).unbind(0)
        return q, k, v

    def mask(self, mask: Optional[torch.Tensor], heads: int) -> Optional[torch.Tensor]:
        return _mask_heads(mask, heads, self.u_index, self.u)

    def back(self, out: torch.Tensor, q_sizes: list[int]) -> torch.Tensor:
        out = out.contiguous()
        if self.ug is None:
            return out
        return all_to_all(out, 2, 1, self.ug, scatter_sizes=q_sizes[self.chunk])


@torch.library.custom_op("xdit_pipefusion::fill_kv_attention", mutates_args=())
def fill_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      scale: Optional[float], enable_gqa: bool, layer: str, pieces: list[int],
                      ulysses_group: Optional[str], ring_group: Optional[str], q_sizes: list[int],
                      kv_sizes: list[int]) -> torch.Tensor:
    """Exact attention over the full sequence; keeps (this rank's head slice of) the whole K/V.

    ``q_sizes``/``kv_sizes``: token lengths of all R*U sp ranks, in sp-rank order; ``pieces``:
    flattened ``(global start, length)`` of the gathered keys (sp-rank order); ``mask``: keys in
    that gathered order, queries as the core's Ulysses / ring / USP attention has them.
    """
    sp = _Sp(ulysses_group, ring_group)
    heads = q.size(1)
    q, k, v = sp.gather(q, k, v, q_sizes, kv_sizes)
    kb, vb = torch.empty_like(k), torch.empty_like(v)
    _write(kb, vb, k, v, pieces)
    _store().put(layer, kb, vb)
    out = local_attention(q, k, v, sp.mask(mask, heads), scale, enable_gqa)
    return sp.back(out, q_sizes)


@torch.library.custom_op("xdit_pipefusion::stale_kv_attention", mutates_args=())
def stale_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       scale: Optional[float], enable_gqa: bool, layer: str, pieces: list[int],
                       ulysses_group: Optional[str], ring_group: Optional[str], q_sizes: list[int],
                       kv_sizes: list[int]) -> torch.Tensor:
    """Attention of a patch's queries over the buffer, refreshed with the patch's fresh K/V.

    ``q_sizes``/``kv_sizes``: token lengths of the patch on all R*U sp ranks (sp-rank order);
    ``pieces``: flattened ``(global start, length)`` of the patch's gathered keys; ``mask``:
    keys in global order (the buffer's), queries as for ``fill_kv_attention``.
    """
    sp = _Sp(ulysses_group, ring_group)
    heads = q.size(1)
    q, k, v = sp.gather(q, k, v, q_sizes, kv_sizes)
    kb, vb = _store().get(layer)
    _write(kb, vb, k, v, pieces)
    out = local_attention(q, kb, vb, sp.mask(mask, heads), scale, enable_gqa)
    return sp.back(out, q_sizes)


def _fake_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The real ops return contiguous outputs (inductor checks strides against this).
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@fill_kv_attention.register_fake
def _(q, k, v, mask, scale, enable_gqa, layer, pieces, ulysses_group, ring_group, q_sizes, kv_sizes):  # type: ignore[no-untyped-def]
    return _fake_out(q, v)


@stale_kv_attention.register_fake
def _(q, k, v, mask, scale, enable_gqa, layer, pieces, ulysses_group, ring_group, q_sizes, kv_sizes):  # type: ignore[no-untyped-def]
    return _fake_out(q, v)


FILL = torch.ops.xdit_pipefusion.fill_kv_attention.default
STALE = torch.ops.xdit_pipefusion.stale_kv_attention.default


@dataclass
class StepState:
    """Which step, stream and generation a call belongs to (see the module docstring)."""

    warmup_steps: int
    step: int = -1
    stream: int = 0
    last_key: tuple | None = None
    seen: set = field(default_factory=set)
    filled: set = field(default_factory=set)  # streams whose buffers hold a full step
    epoch: int = 0
    generations: int = 0

    def on_call(self, key: tuple | None, branch: int | None = None) -> tuple[int, int, bool]:
        """(step, stream, full) for the next call; ``full``: run the whole sequence synchronously.

        ``branch``: the guidance branch the call computes when the caller knows it (CFG across
        calls: a cfg group computes branch ``b`` as its only call of a step), used as the stream
        instead of counting the step's calls, so each branch keeps its own K/V buffers."""
        new_gen = self.step < 0 or self.epoch != context().kv_epoch
        if key is None:
            same = False
        else:
            same = key == self.last_key and not new_gen
            if not same and not new_gen and (key in self.seen or sum(key) > sum(self.last_key or key)):
                new_gen = True
        if new_gen:
            self.epoch, self.step, self.stream = context().kv_epoch, 0, 0
            self.seen, self.filled = set(), set()
            self.generations += 1
        elif same:
            self.stream = self.stream + 1 if branch is None else branch
        else:
            self.step, self.stream = self.step + 1, 0 if branch is None else branch
        if key is not None:
            self.seen.add(key)
        self.last_key = key
        full = self.step < self.warmup_steps or self.stream not in self.filled
        return self.step, self.stream, full

    def done(self, stream: int, full: bool) -> None:
        if full:
            self.filled.add(stream)
