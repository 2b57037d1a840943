"""Point-to-point transfers between neighbouring pipeline stages, and the output broadcast.

The pipeline driver runs outside the compiled stage programs, so these are plain
``torch.distributed`` calls: every boundary crossing is *one* ``isend``/``irecv`` of the
boundary tensors packed into a byte buffer (tagged with the patch index), posted ahead of
the compute so that transfers overlap it. ``record_p2p()`` logs what this process sends and
receives, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ..runtime.collectives import log_into

Meta = tuple[tuple[int, ...], torch.dtype]


class P2PRecord(NamedTuple):
    kind: str  # "send", "recv" or "broadcast"
    peer: int  # global rank of the other end (the source for broadcast)
    nbytes: int


_LOGS: list[list[P2PRecord]] = []


@contextlib.contextmanager
def record_p2p() -> Iterator[list[P2PRecord]]:
    """Log every pipeline transfer this process takes part in while the block runs."""
    with log_into(_LOGS) as log:
        yield log


def _record(kind: str, peer: int, nbytes: int) -> None:
    for log in _LOGS:
        log.append(P2PRecord(kind, peer, nbytes))


def nbytes(metas: Sequence[Meta]) -> int:
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in metas)


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buf: torch.Tensor, metas: Sequence[Meta]) -> list[torch.Tensor]:
    out, off = [], 0
    for shape, dtype in metas:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(buf.narrow(0, off, size).view(dtype).view(shape))
        off += size
    return out


def isend(tensors: Sequence[torch.Tensor], peer: int, tag: int) -> "Pending":
    """Send ``tensors`` packed into one buffer; ``wait()`` on the result before reusing it."""
    buf = pack(tensors)
    if buf.numel() == 0:
        return Pending(buf, None, [])
    _record("send", peer, buf.numel())
    return Pending(buf, dist.isend(buf, peer, tag=tag), [])


class Pending(NamedTuple):
    buf: torch.Tensor
    work: dist.Work | None
    metas: list[Meta]

    def wait(self) -> list[torch.Tensor]:
        if self.work is not None:
            self.work.wait()
        return unpack(self.buf, self.metas)


def irecv(metas: Sequence[Meta], peer: int, tag: int) -> Pending:
    buf = torch.empty(nbytes(metas), dtype=torch.uint8)
    if buf.numel() == 0:
        return Pending(buf, None, list(metas))
    _record("recv", peer, buf.numel())
    return Pending(buf, dist.irecv(buf, peer, tag=tag), list(metas))


def broadcast(tensors: list[torch.Tensor] | None, metas: Sequence[Meta], src: int, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """The last stage's output tensors on every rank of the pipeline group."""
    buf = pack(tensors) if tensors is not None else torch.empty(nbytes(metas), dtype=torch.uint8)
    if buf.numel():
        _record("broadcast", src, buf.numel())
        dist.broadcast(buf, src, group=group)
    return [t.clone() for t in unpack(buf, metas)]
