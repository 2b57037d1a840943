"""The pieces every way of running ranks shares: how a rank starts, how its report travels back,
and how the parent waits for reports without ever hanging (:mod:`.harness` spawns ranks per call,
:mod:`.pool` keeps them between calls).

Results travel back serialised by ``torch.save`` into bytes, never through torch's
shared-memory tensor reductions: a child may exit right after reporting, and shared storage
owned by an exited process is exactly what those reductions handle badly.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import torch

__all__ = ["Report", "SpmdError", "child_setup", "collect", "detach_result", "dumps", "free_port", "kill", "loads"]

# How long to wait for a rank's report once its process has exited: the bytes are already in
# the pipe by then, this only covers scheduling noise.
_LATE_REPORT_GRACE_S = 2.0


class SpmdError(RuntimeError):
    """A rank of :func:`run_spmd` failed, died, or did not finish in time."""


@dataclass(frozen=True)
class Report:
    """What a child sends back: its result or its formatted traceback."""

    rank: int
    ok: bool
    payload: Any  # the result when ok, else the traceback text


def free_port() -> int:
    # Binding to port 0 lets the kernel pick; there is a small window before the child binds
    # it again, which is acceptable for tests on one machine.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def detach_result(obj: Any) -> Any:
    """Turn tensors into plain CPU tensors that own their memory, so ``torch.save`` never sees
    a tensor subclass (e.g. an un-waited collective result) or a view of a larger buffer."""
    if isinstance(obj, torch.Tensor):
        source = obj.detach().cpu()
        return torch.empty(source.shape, dtype=source.dtype).copy_(source)
    if isinstance(obj, dict):
        return {key: detach_result(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [detach_result(item) for item in obj]
    if isinstance(obj, tuple):
        items = [detach_result(item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def child_setup(rank_: int, world_size_: int, port: int) -> None:
    """What every rank does first: its own process group, the rendezvous variables, one thread."""
    # Own process group, so the parent can also take down helpers this rank spawns
    # (inductor compile workers) with a single killpg.
    os.setpgid(0, 0)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank_)
    os.environ["WORLD_SIZE"] = str(world_size_)
    torch.set_num_threads(1)


def kill(proc: BaseProcess) -> None:
    """SIGKILL a rank and whatever it spawned (its process group), then the rank itself."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone, or the child had not reached setpgid yet
    if proc.exitcode is None:
        proc.kill()


def collect(
    fn: Callable[..., Any],
    procs: list[BaseProcess],
    readers: list[connection.Connection],
    deadline: float,
    timeout: float,
) -> list[Any]:
    """Wait for every rank's report; raise on the first failure, silent death or the deadline."""
    name = getattr(fn, "__qualname__", repr(fn))
    results: dict[int, Any] = {}
    pending = set(range(len(procs)))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            ranks = sorted(pending)
            raise SpmdError(
                f"run_spmd({name}): timed out after {timeout:.1f}s; rank(s) {ranks} did not finish"
                f" (finished: {sorted(results)}). All ranks were killed."
            )
        waitables = [readers[r] for r in pending] + [procs[r].sentinel for r in pending]
        for ready in connection.wait(waitables, timeout=remaining):
            rank_ = _rank_of(ready, readers, procs)
            if rank_ not in pending:
                continue
            report = _read_report(readers[rank_], procs[rank_], rank_, name)
            if not report.ok:
                raise SpmdError(
                    f"run_spmd({name}): rank {rank_} raised; the other ranks were killed.\n"
                    f"--- traceback of rank {rank_} ---\n{report.payload}"
                )
            results[rank_] = report.payload
            pending.discard(rank_)
    return [results[r] for r in range(len(procs))]


def _rank_of(ready: Any, readers: list[connection.Connection], procs: list[BaseProcess]) -> int:
    for rank_, (reader, proc) in enumerate(zip(readers, procs)):
        if ready is reader or ready == proc.sentinel:
            return rank_
    raise AssertionError("connection.wait returned an object run_spmd did not wait on")


def _read_report(
    reader: connection.Connection, proc: BaseProcess, rank_: int, name: str
) -> Report:
    """Read a rank's report, or explain why there is none."""
    if reader.poll(_LATE_REPORT_GRACE_S):
        try:
            return loads(reader.recv_bytes())
        except EOFError:
            pass
    proc.join(_LATE_REPORT_GRACE_S)
    raise SpmdError(
        f"run_spmd({name}): rank {rank_} exited with code {proc.exitcode} without reporting a"
        " result (killed by a signal, os._exit, or a crash in native code); the other ranks"
        " were killed."
    )
