"""Run one function on several local processes joined by a ``torch.distributed`` group.

``run_spmd(fn, world_size, *args)`` is how the tests exercise real collectives on a laptop:
each rank is a fresh "spawn" process with an initialised default process group (gloo by
default). The parent never hangs on a broken rank: the first failure, a rank that dies
silently, or the deadline kills every child and raises :class:`SpmdError` with the story.

Results travel back serialised by ``torch.save`` into bytes, never through torch's
shared-memory tensor reductions: a child exits right after reporting, and shared storage
owned by an exited process is exactly what those reductions handle badly.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import connection, get_context
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SpmdError", "rank", "run_spmd", "world_size"]

# How long to wait for a rank's report once its process has exited: the bytes are already in
# the pipe by then, this only covers scheduling noise.
_LATE_REPORT_GRACE_S = 2.0
# How long ranks that reported success get to exit on their own before being killed.
_EXIT_GRACE_S = 10.0


class SpmdError(RuntimeError):
    """A rank of :func:`run_spmd` failed, died, or did not finish in time."""


@dataclass(frozen=True)
class _Report:
    """What a child sends back: its result or its formatted traceback."""

    rank: int
    ok: bool
    payload: Any  # the result when ok, else the traceback text


def rank() -> int:
    """This process's rank in the default process group."""
    return dist.get_rank()


def world_size() -> int:
    """The size of the default process group."""
    return dist.get_world_size()


def _free_port() -> int:
    # Binding to port 0 lets the kernel pick; there is a small window before the child binds
    # it again, which is acceptable for tests on one machine.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _detach_result(obj: Any) -> Any:
    """Turn tensors into plain CPU tensors that own their memory, so ``torch.save`` never sees
    a tensor subclass (e.g. an un-waited collective result) or a view of a larger buffer."""
    if isinstance(obj, torch.Tensor):
        source = obj.detach().cpu()
        return torch.empty(source.shape, dtype=source.dtype).copy_(source)
    if isinstance(obj, dict):
        return {key: _detach_result(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_detach_result(item) for item in obj]
    if isinstance(obj, tuple):
        items = [_detach_result(item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Temporarily apply ``env`` to this process's environment."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child_setup(rank_: int, world_size_: int, port: int) -> None:
    """What every rank does first: its own process group, the rendezvous variables, one thread."""
    # Own process group, so the parent can also take down helpers this rank spawns
    # (inductor compile workers) with a single killpg.
    os.setpgid(0, 0)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank_)
    os.environ["WORLD_SIZE"] = str(world_size_)
    torch.set_num_threads(1)


def _child_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank_: int,
    world_size_: int,
    port: int,
    backend: str,
    timeout: float,
    conn: connection.Connection,
) -> None:
    """Entry point of one rank; module-level so "spawn" can pickle it by reference."""
    _child_setup(rank_, world_size_, port)
    try:
        dist.init_process_group(
            backend, rank=rank_, world_size=world_size_, timeout=timedelta(seconds=timeout)
        )
        report = _Report(rank_, True, _detach_result(fn(*args)))
        data = _dumps(report)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent as text
        data = _dumps(_Report(rank_, False, traceback.format_exc()))
    conn.send_bytes(data)
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def _kill(proc: BaseProcess) -> None:
    """SIGKILL a rank and whatever it spawned (its process group), then the rank itself."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone, or the child had not reached setpgid yet
    if proc.exitcode is None:
        proc.kill()


def run_spmd(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    fresh: bool = False,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes and return their results by rank.

    Each child sets one intra-op thread, initialises the default process group (``backend``,
    rendezvous on 127.0.0.1 at a free port chosen here), calls ``fn`` and sends its return
    value back. ``fn`` must be a module-level function and its result picklable by
    ``torch.save``; tensors come back as plain CPU tensors. ``env`` is added to each child's
    environment from its first instruction (it is set in this process while the children
    start, then restored).

    Raises :class:`SpmdError` when a rank raises (message: the rank and its traceback), exits
    without reporting, or when ``timeout`` seconds pass (message: the ranks still running).
    In every case all children are killed and reaped before this returns or raises.

    With ``XDIT_SPMD_REUSE=1`` in the environment (the test suite sets it) and neither ``env``
    nor ``fresh=True`` given, the call runs on ranks kept from an earlier call of the same world
    size, backend and timeout (:mod:`xdit_compile.testing.pool`): the same contract, without
    paying each spawn again.
    """
    if world_size < 1:
        raise SpmdError(f"run_spmd: world_size must be >= 1, got {world_size}")
    if env is None and not fresh:
        from xdit_compile.testing import pool

        if pool.reuse_enabled():
            return pool.run_in_pool(fn, world_size, args, timeout=timeout, backend=backend)
    ctx = get_context("spawn")
    port = _free_port()
    procs: list[BaseProcess] = []
    readers: list[connection.Connection] = []
    try:
        for rank_ in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child_main,
                args=(fn, args, rank_, world_size, port, backend, timeout, writer),
                name=f"spmd-rank{rank_}",
                daemon=True,
            )
            # The child inherits the environment at exec time, before it imports anything:
            # settings read at import (e.g. inductor's compile threads) need it there.
            with _environment(env or {}):
                proc.start()
            writer.close()  # the parent keeps only the read end, so EOF means the child is gone
            procs.append(proc)
            readers.append(reader)
        results = _collect(fn, procs, readers, time.monotonic() + timeout, timeout)
        # Let reported ranks finish their own teardown: a SIGKILL mid-exit leaves their
        # multiprocessing resources (e.g. inductor's compile pool semaphores) behind.
        exit_deadline = time.monotonic() + _EXIT_GRACE_S
        for proc in procs:
            proc.join(max(0.0, exit_deadline - time.monotonic()))
        return results
    finally:
        for proc in procs:
            _kill(proc)
        for proc in procs:
            proc.join()
        for reader in readers:
            reader.close()


def _collect(
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
) -> _Report:
    """Read a rank's report, or explain why there is none."""
    if reader.poll(_LATE_REPORT_GRACE_S):
        try:
            return _loads(reader.recv_bytes())
        except EOFError:
            pass
    proc.join(_LATE_REPORT_GRACE_S)
    raise SpmdError(
        f"run_spmd({name}): rank {rank_} exited with code {proc.exitcode} without reporting a"
        " result (killed by a signal, os._exit, or a crash in native code); the other ranks"
        " were killed."
    )
