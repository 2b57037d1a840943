"""Collective buffers kept between eager calls, so the large ones are not faulted in every call.

On CPU a fresh tensor above glibc's mmap threshold (at most 32 MiB) is a fresh ``mmap``: every
page is faulted in and zeroed again on each call, and freeing it gives it back to the kernel.
Ulysses' packed q/k/v all-to-all is exactly such a buffer at real shapes (PixArt-alpha 1024 px,
2 ranks: 3 x 19 MiB = 56 MiB on each side); writing it fresh costs ~28 ms against ~3 ms for
the same copy into a buffer already resident (measured here, one thread). Peers that send q, k
and v in three all-to-alls of 19 MiB stay under the threshold and reuse heap memory instead.

:func:`scratch` hands out a buffer from a small per-process pool (``Context.buffers``) keyed by
``(role, numel, dtype, device)``. A pooled buffer is handed out again only when nothing else
holds its storage any more (no view of it is alive: the storage's use count is back to what it
was when the pool alone held it), so a caller that keeps a view (autograd, a user holding an
output) simply makes the next call allocate a fresh one. Only eager CPU calls pool: traced code
(Dynamo, make_fx, inductor) and devices with a caching allocator allocate as usual.

Reads/writes: ``context.current().buffers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xdit_compile.context import current

__all__ = ["MIN_POOLED_BYTES", "pooling", "scratch"]

MIN_POOLED_BYTES = 1 << 20  # below this the allocator's own free lists already reuse memory
MAX_ENTRIES = 16  # distinct (role, size) buffers kept per process; the oldest goes first


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def pooling(x: torch.Tensor) -> bool:
    """Whether buffers for a collective on ``x`` come from the pool now: eager (not traced, no
    fake mode), a plain CPU tensor (not a subclass such as a fake or distributed tensor)."""
    if x.device.type != "cpu" or type(x) is not torch.Tensor:
        return False
    return _eager()


def _eager() -> bool:
    import torch.distributed._functional_collectives as funcol

    return not (torch.compiler.is_compiling() or funcol._are_we_tracing())


def scratch(role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` for a collective's send or receive side.

    ``role`` names the use (e.g. ``"ulysses.send"``) so that two buffers live at once never
    share an entry. Pooled when running eagerly on CPU and the buffer has at least
    ``MIN_POOLED_BYTES``; otherwise (or while the pooled one is still referenced) a fresh
    ``torch.empty``. The caller must fill every element it reads.
    """
    numel = 1
    for n in shape:
        numel *= int(n)
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_POOLED_BYTES or device.type != "cpu" or not _eager():
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    pool = current().buffers
    key = (role, numel, dtype, str(device))
    entry = pool.get(key)
    if entry is not None:
        buf, idle = entry
        if _use_count(buf) == idle:
            pool[key] = pool.pop(key)  # most recently used last
            return buf.view(tuple(shape))
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    buf = torch.empty(numel, dtype=dtype, device=device)
    if len(pool) >= MAX_ENTRIES:
        pool.pop(next(iter(pool)))
    pool[key] = (buf, _use_count(buf))
    return buf.view(tuple(shape))
