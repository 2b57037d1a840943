"""Run one function on several local processes joined by a ``torch.distributed`` group.

``run_spmd(fn, world_size, *args)`` is how the tests exercise real collectives on a laptop:
each rank is a fresh "spawn" process with an initialised default process group (gloo by
default). The parent never hangs on a broken rank: the first failure, a rank that dies
silently, or the deadline kills every child and raises :class:`SpmdError` with the story.

How a rank starts and reports is in :mod:`.ranks`; :mod:`.pool` keeps ranks between calls.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing import connection, get_context
from multiprocessing.process import BaseProcess
from typing import Any

import torch.distributed as dist

from xdit_compile.testing import pool
from xdit_compile.testing.ranks import (
    Report, SpmdError, child_setup, collect, detach_result, dumps, free_port, kill,
)

__all__ = ["SpmdError", "rank", "run_spmd", "world_size"]

# How long ranks that reported success get to exit on their own before being killed.
_EXIT_GRACE_S = 10.0


def rank() -> int:
    """This process's rank in the default process group."""
    return dist.get_rank()


def world_size() -> int:
    """The size of the default process group."""
    return dist.get_world_size()


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
    child_setup(rank_, world_size_, port)
    try:
        dist.init_process_group(
            backend, rank=rank_, world_size=world_size_, timeout=timedelta(seconds=timeout)
        )
        report = Report(rank_, True, detach_result(fn(*args)))
        data = dumps(report)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent as text
        data = dumps(Report(rank_, False, traceback.format_exc()))
    conn.send_bytes(data)
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


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
    size and backend (:mod:`xdit_compile.testing.pool`): the same contract, without
    paying each spawn again.
    """
    if world_size < 1:
        raise SpmdError(f"run_spmd: world_size must be >= 1, got {world_size}")
    if env is None and not fresh and pool.reuse_enabled():
        return pool.run_in_pool(fn, world_size, args, timeout=timeout, backend=backend)
    ctx = get_context("spawn")
    port = free_port()
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
        results = collect(fn, procs, readers, time.monotonic() + timeout, timeout)
        # Let reported ranks finish their own teardown: a SIGKILL mid-exit leaves their
        # multiprocessing resources (e.g. inductor's compile pool semaphores) behind.
        exit_deadline = time.monotonic() + _EXIT_GRACE_S
        for proc in procs:
            proc.join(max(0.0, exit_deadline - time.monotonic()))
        return results
    finally:
        for proc in procs:
            kill(proc)
        for proc in procs:
            proc.join()
        for reader in readers:
            reader.close()

