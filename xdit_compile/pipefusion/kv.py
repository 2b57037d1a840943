"""Per-layer K/V buffers, the step/stream state that decides when they are fresh, and the two
attention ops the PipeFusion programs call.

* ``fill_kv_attention`` (full-sequence calls: warmup steps): exact attention; stores the
  layer's whole K/V into the current stream's buffer.
* ``stale_kv_attention`` (patch calls): writes the patch's fresh K/V into the buffer at its
  global token positions and attends over the whole buffer, so the patch sees fresh K/V for
  itself and the patches before it in this step, and the previous step's K/V for the rest.
* ``fill_kv_ulysses_attention`` / ``stale_kv_ulysses_attention``: the same with Ulysses inside
  the stage: the all-to-all first, then the buffer holds this rank's head slice of the whole
  sequence (so every sequence-parallel rank sees every patch), then the all-to-all back.

Both are ``torch.library`` custom ops (opaque to inductor, traceable by Dynamo and
FakeTensor); the buffers live in the ``KVStore`` the driver makes current around each call.

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
import torch.nn.functional as F

from ..runtime.attention import _mask_heads, _ulysses_scatter_heads
from ..runtime.collectives import all_to_all, group_rank, group_size

_CURRENT: list["KVStore"] = []
_RESET_EPOCH = [0]


def reset() -> None:
    """Start a new generation on the next call of every PipeFusion-compiled graph."""
    _RESET_EPOCH[0] += 1


@dataclass
class KVStore:
    """K/V buffers of one compiled graph on one rank, per (stream, layer)."""

    buffers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stream: int = 0

    def put(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> None:
        self.buffers[(self.stream, layer)] = (k.detach().clone(), v.detach().clone())

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
        _CURRENT.append(self)
        try:
            yield
        finally:
            _CURRENT.pop()


def _store() -> KVStore:
    if not _CURRENT:
        raise RuntimeError("pipefusion attention ops run only inside a PipeFusion pipeline call")
    return _CURRENT[-1]


@torch.library.custom_op("xdit_pipefusion::fill_kv_attention", mutates_args=())
def fill_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      scale: Optional[float], enable_gqa: bool, layer: str) -> torch.Tensor:
    """Exact attention over the full sequence; keeps K/V for the patch steps."""
    _store().put(layer, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa).contiguous()


def _refresh(layer: str, k: torch.Tensor, v: torch.Tensor, pieces: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's buffer with ``k``/``v`` written at their global positions (``pieces``)."""
    kb, vb = _store().get(layer)
    off = 0
    for start, length in zip(pieces[0::2], pieces[1::2]):
        kb.narrow(-2, start, length).copy_(k.narrow(-2, off, length))
        vb.narrow(-2, start, length).copy_(v.narrow(-2, off, length))
        off += length
    return kb, vb


@torch.library.custom_op("xdit_pipefusion::stale_kv_attention", mutates_args=())
def stale_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       scale: Optional[float], enable_gqa: bool, layer: str, pieces: list[int]) -> torch.Tensor:
    """Attention of a patch's queries over the buffer, refreshed with the patch's K/V.

    ``pieces`` = flattened ``(global start, length)`` pairs of the patch's tokens, in local order.
    """
    kb, vb = _refresh(layer, k, v, pieces)
    return F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask, scale=scale, enable_gqa=enable_gqa).contiguous()


# ---------------------------------------------------------------------------- with Ulysses inside a stage
# The K/V buffer of a rank holds its Ulysses head slice of the *whole* sequence (after the
# all-to-all), in global token order, so each sequence-parallel rank sees every patch.


@torch.library.custom_op("xdit_pipefusion::fill_kv_ulysses_attention", mutates_args=())
def fill_kv_ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                              scale: Optional[float], enable_gqa: bool, layer: str, pieces: list[int], group: str,
                              q_sizes: list[int], kv_sizes: list[int]) -> torch.Tensor:
    """``ulysses_attention`` that also keeps this rank's head slice of the whole K/V.

    ``pieces``: flattened ``(global start, length)`` of the gathered keys, in gathered order;
    ``mask`` is aligned with the gathered order (as ``ulysses_attention``'s).
    """
    heads, index, ranks = q.size(1), group_rank(group), group_size(group)
    q, k, v = _ulysses_scatter_heads(q, k, v, group, q_sizes, kv_sizes)
    kb, vb = torch.empty_like(k), torch.empty_like(v)
    off = 0
    for start, length in zip(pieces[0::2], pieces[1::2]):
        kb.narrow(-2, start, length).copy_(k.narrow(-2, off, length))
        vb.narrow(-2, start, length).copy_(v.narrow(-2, off, length))
        off += length
    _store().put(layer, kb, vb)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask_heads(mask, heads, index, ranks), scale=scale,
                                         enable_gqa=enable_gqa)
    return all_to_all(out.contiguous(), 2, 1, group, scatter_sizes=q_sizes)


@torch.library.custom_op("xdit_pipefusion::stale_kv_ulysses_attention", mutates_args=())
def stale_kv_ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                               scale: Optional[float], enable_gqa: bool, layer: str, pieces: list[int], group: str,
                               q_sizes: list[int], kv_sizes: list[int]) -> torch.Tensor:
    """A patch spread over a Ulysses group: all-to-all q/k/v (the patch's tokens, 1/N of the
    heads), write the patch's K/V into the buffer, attend over the buffer, all-to-all back.

    ``pieces``: flattened ``(global start, length)`` of the patch's gathered keys, in gathered
    order; ``mask``: queries in gathered order, keys in global order.
    """
    heads, index, ranks = q.size(1), group_rank(group), group_size(group)
    q, k, v = _ulysses_scatter_heads(q, k, v, group, q_sizes, kv_sizes)
    kb, vb = _refresh(layer, k, v, pieces)
    out = F.scaled_dot_product_attention(q, kb, vb, attn_mask=_mask_heads(mask, heads, index, ranks), scale=scale,
                                         enable_gqa=enable_gqa)
    return all_to_all(out.contiguous(), 2, 1, group, scatter_sizes=q_sizes)


def _fake_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The real ops return contiguous outputs (inductor checks strides against this).
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@fill_kv_attention.register_fake
def _(q, k, v, mask, scale, enable_gqa, layer):  # type: ignore[no-untyped-def]
    return _fake_out(q, v)


@stale_kv_attention.register_fake
def _(q, k, v, mask, scale, enable_gqa, layer, pieces):  # type: ignore[no-untyped-def]
    return _fake_out(q, v)


@fill_kv_ulysses_attention.register_fake
def _(q, k, v, mask, scale, enable_gqa, layer, pieces, group, q_sizes, kv_sizes):  # type: ignore[no-untyped-def]
    return _fake_out(q, v)


@stale_kv_ulysses_attention.register_fake
def _(q, k, v, mask, scale, enable_gqa, layer, pieces, group, q_sizes, kv_sizes):  # type: ignore[no-untyped-def]
    return _fake_out(q, v)


FILL = torch.ops.xdit_pipefusion.fill_kv_attention.default
STALE = torch.ops.xdit_pipefusion.stale_kv_attention.default
FILL_ULYSSES = torch.ops.xdit_pipefusion.fill_kv_ulysses_attention.default
STALE_ULYSSES = torch.ops.xdit_pipefusion.stale_kv_ulysses_attention.default


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

    def on_call(self, key: tuple | None) -> tuple[int, int, bool]:
        """(step, stream, full) for the next call; ``full``: run the whole sequence synchronously."""
        new_gen = self.step < 0 or self.epoch != _RESET_EPOCH[0]
        if key is None:
            same = False
        else:
            same = key == self.last_key and not new_gen
            if not same and not new_gen and (key in self.seen or sum(key) > sum(self.last_key or key)):
                new_gen = True
        if new_gen:
            self.epoch, self.step, self.stream = _RESET_EPOCH[0], 0, 0
            self.seen, self.filled = set(), set()
            self.generations += 1
        elif same:
            self.stream += 1
        else:
            self.step, self.stream = self.step + 1, 0
        if key is not None:
            self.seen.add(key)
        self.last_key = key
        full = self.step < self.warmup_steps or self.stream not in self.filled
        return self.step, self.stream, full

    def done(self, stream: int, full: bool) -> None:
        if full:
            self.filled.add(stream)
