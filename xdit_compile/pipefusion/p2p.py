"""Point-to-point transfers between neighbouring pipeline stages, and the output broadcast.

The pipeline driver runs outside the compiled stage programs, so these are plain
``torch.distributed`` calls: every boundary crossing is *one* ``isend``/``irecv`` of the
boundary tensors packed into a byte buffer (tagged with the patch index), posted ahead of
the compute so that transfers overlap it. ``record_p2p()`` logs what this process sends and
receives, for tests and benchmarks.

A transfer that waits longer than the plan's ``timeout`` (``use_pipeline``; else the default
group's) raises ``CollectiveTimeoutError`` naming this rank, the peer, the stage boundary
and the pipeline's ranks, instead of gloo's bare "Timed out waiting ...".
"""

from __future__ import annotations

import contextlib
import math
import re
from datetime import timedelta
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ..errors import CollectiveTimeoutError
from ..context import current
from ..runtime.collectives import log_into
from ..runtime.devices import collective_device

Meta = tuple[tuple[int, ...], torch.dtype]


class P2PRecord(NamedTuple):
    kind: str  # "send", "recv" or "broadcast"
    peer: int  # global rank of the other end (the source for broadcast)
    nbytes: int


@contextlib.contextmanager
def record_p2p() -> Iterator[list[P2PRecord]]:
    """Log every pipeline transfer this process takes part in while the block runs."""
    with log_into(current().p2p_logs) as log:
        yield log


def _record(kind: str, peer: int, nbytes: int) -> None:
    for log in current().p2p_logs:
        log.append(P2PRecord(kind, peer, nbytes))


def nbytes(metas: Sequence[Meta]) -> int:
    return sum(math.prod(s) * d.itemsize for s, d in metas)


def pack(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, dtype=torch.uint8, device=device if device is not None else collective_device())
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buf: torch.Tensor, metas: Sequence[Meta]) -> list[torch.Tensor]:
    out, off = [], 0
    for shape, dtype in metas:
        size = math.prod(shape) * dtype.itemsize
        out.append(buf.narrow(0, off, size).view(dtype).view(shape))
        off += size
    return out


_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def use_pipeline(ranks: Sequence[int], timeout: timedelta | None) -> None:
    """This rank's pipeline (global ranks in stage order) and how long its transfers may wait."""
    me = dist.get_rank()
    for r in ranks:
        if r != me:
            current().pipelines[r] = (tuple(ranks), timeout)


def isend(tensors: Sequence[torch.Tensor], peer: int, tag: int) -> "Pending":
    """Send ``tensors`` packed into one buffer; ``wait()`` on the result before reusing it."""
    buf = pack(tensors)
    if buf.numel() == 0:
        return Pending(buf, None, [])
    _record("send", peer, buf.numel())
    return Pending(buf, dist.isend(buf, peer, tag=tag), [], "send", peer, tag)


class Pending(NamedTuple):
    buf: torch.Tensor
    work: dist.Work | None
    metas: list[Meta]
    kind: str = ""  # "send" or "recv", for the timeout message
    peer: int = -1
    tag: int = 0

    def wait(self) -> list[torch.Tensor]:
        if self.work is not None:
            timeout = current().pipelines.get(self.peer, ((), None))[1]
            try:
                self.work.wait(timeout) if timeout is not None else self.work.wait()
            except RuntimeError as e:
                named = _timed_out(e, self.kind, self.peer, f"tag {self.tag}")
                if named is None:
                    raise
                raise named from e
        return unpack(self.buf, self.metas)


def irecv(metas: Sequence[Meta], peer: int, tag: int, device: torch.device | None = None) -> Pending:
    """Post the receive of ``metas`` from ``peer`` into a buffer on ``device`` (default: the default group's)."""
    buf = torch.empty(nbytes(metas), dtype=torch.uint8, device=device if device is not None else collective_device())
    if buf.numel() == 0:
        return Pending(buf, None, list(metas))
    _record("recv", peer, buf.numel())
    return Pending(buf, dist.irecv(buf, peer, tag=tag), list(metas), "recv", peer, tag)


def broadcast(tensors: list[torch.Tensor] | None, metas: Sequence[Meta], src: int, group: dist.ProcessGroup,
              device: torch.device | None = None) -> list[torch.Tensor]:
    """The last stage's output tensors on every rank of the pipeline group (received on ``device``)."""
    device = device if device is not None else collective_device(group)
    buf = pack(tensors, device) if tensors is not None else torch.empty(nbytes(metas), dtype=torch.uint8, device=device)
    if buf.numel():
        _record("broadcast", src, buf.numel())
        try:
            dist.broadcast(buf, src, group=group)
        except RuntimeError as e:
            named = _timed_out(e, "broadcast", src, "the output of the last stage")
            if named is None:
                raise
            raise named from e
    return [t.clone() for t in unpack(buf, metas)]


def _timed_out(error: RuntimeError, kind: str, peer: int, what: str) -> CollectiveTimeoutError | None:
    """``CollectiveTimeoutError`` naming the transfer when ``error`` is a timeout, else None."""
    if not _TIMED_OUT.search(str(error)):
        return None
    me = dist.get_rank()
    ranks, timeout = current().pipelines.get(peer, ((), None))
    stage = lambda r: f"stage {ranks.index(r)} (rank {r})" if r in ranks else f"rank {r}"  # noqa: E731
    edge = {"send": f"sending to {stage(peer)}", "recv": f"receiving from {stage(peer)}",
            "broadcast": f"in the output broadcast from {stage(peer)}"}[kind]
    waited = f"{timeout.total_seconds():g} s" if timeout is not None else "the default group's timeout"
    return CollectiveTimeoutError(
        f"xdit: PipeFusion {stage(me)} timed out after {waited} {edge} ({kind}, {what}; pipeline ranks "
        f"{list(ranks)}): that rank is stuck, died, or called the model differently; its own traceback shows "
        f"where it is. Raise the option timeout if it legitimately needs longer. The backend said: "
        f"{str(error).strip().splitlines()[0][:300]}"
    )
