"""Ranks kept alive between :func:`run_spmd` calls, so a test suite pays each spawn once.

A spawned rank costs seconds before it runs anything (interpreter, torch, diffusers, the process
group, Dynamo's first compile). With ``XDIT_SPMD_REUSE=1`` in the environment (the test suite's
``conftest.py`` sets it), :func:`run_spmd` hands each call to a *pool* of ranks of the same world
size and backend, started on first use and kept for the next call. Each call's ``timeout`` is
enforced by the parent as before (it kills the pool at the deadline); the ranks' default process
group gets a long timeout of its own, so one pool serves calls with any deadline.

Between two calls every rank puts back what a call may leave behind, so each call still starts
from what a fresh rank would see:

- Dynamo's caches and counters (``torch._dynamo.reset``, ``utils.counters``: the plan report reads
  graph breaks from them) and xdit_compile's context (``context.reset``);
- the process groups the call created (destroyed after a barrier, so no peer still uses them);
- Dynamo's and inductor's config entries a call set without restoring them (e.g. capturing
  data-dependent ops, which turns a later test's graph break into no break);
- ``os.environ``, torch's default dtype, grad mode and the default generator's seed;
- modules a call put into ``sys.modules`` by hand (stand-ins for flash-attn / xformers, which a
  later ``import diffusers`` would probe).

Anything going wrong ends the pool: a rank that raises, dies or misses the deadline takes every
rank of its pool down (the parent kills them as ``run_spmd`` always did), and the next call starts
a fresh one. So does a call whose ranks all returned but did not issue the same collectives on the
default group, or the same number of xdit_compile agreement rounds (a test that provokes a timeout
and catches it): their next collectives would pair up wrongly, so those ranks are not reused.
Calls with ``env=`` (read at a rank's start) always get fresh ranks.
"""

from __future__ import annotations

import atexit
import copy
import gc
import os
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import connection, get_context
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist

from xdit_compile.testing.ranks import (
    Report, child_setup, collect, detach_result, dumps, free_port, kill, loads,
)

__all__ = ["close_pools", "reuse_enabled", "run_in_pool"]

REUSE_ENV = "XDIT_SPMD_REUSE"
# At most this many pools stay alive (least recently used closed first): their ranks hold memory.
MAX_POOLS = 2
# torch's default seed of a fresh process, restored before each call.
_FRESH_SEED = 67280421310721
_READY = "ready"

PoolKey = tuple[int, str]
# The pooled ranks' default-group timeout: longer than any call's deadline, which the parent enforces.
GROUP_TIMEOUT_S = 3600.0


def reuse_enabled() -> bool:
    """Whether ``run_spmd`` should reuse ranks (``XDIT_SPMD_REUSE=1``), read at each call."""
    return os.environ.get(REUSE_ENV, "0") == "1"


def _configs() -> list[Any]:
    """torch's config modules a call may change for good (``torch._dynamo.config.x = ...``)."""
    import torch._inductor.config

    return [torch._dynamo.config, torch._inductor.config]


def _restore(config: Any, saved: dict[str, Any]) -> None:
    """Set back the entries of ``config`` that differ from ``saved`` (only those: setting a
    deprecated entry warns)."""
    now = config.get_config_copy()
    for name, value in saved.items():
        if now.get(name) != value:
            setattr(config, name, value)


def _reset_rank(environ: dict[str, str], modules: set[str], configs: list[dict[str, Any]]) -> None:
    """Put back what a call may change in a rank, so the next call sees a fresh rank's state."""
    dist.barrier()  # every peer is done with this call's groups before any is destroyed
    for name in set(sys.modules) - modules:
        module = sys.modules[name]
        # Stand-ins a call put in place of packages (no file, no spec): a later import of a real
        # library probes for those packages and must not find the fakes.
        if getattr(module, "__file__", None) is None and getattr(module, "__spec__", None) is None:
            del sys.modules[name]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graph breaks are read from them (report.graph_breaks)
    for config, saved in zip(_configs(), configs):
        _restore(config, saved)
    context = sys.modules.get("xdit_compile.context")
    if context is not None:
        context.reset()
    default = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)
    os.environ.clear()
    os.environ.update(environ)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.manual_seed(_FRESH_SEED)
    gc.collect()


def _marks() -> tuple[int, int]:
    """What must be equal on every rank for the next call to pair up: the collectives issued on the
    default group, and xdit_compile's agreement rounds (they name the store keys)."""
    seq = dist.distributed_c10d._get_default_group()._get_sequence_number_for_group()
    agreement = sys.modules.get("xdit_compile.runtime.agreement")
    rounds = next(copy.copy(agreement._SEQ)) if agreement is not None else 0  # peek, do not advance
    return int(seq), int(rounds)


def _worker_main(rank_: int, world: int, port: int, backend: str, timeout: float,
                 tasks: connection.Connection, reports: connection.Connection) -> None:
    """One pooled rank: join the group, then run calls until the parent closes the task pipe."""
    child_setup(rank_, world, port)
    try:
        dist.init_process_group(backend, rank=rank_, world_size=world, timeout=timedelta(seconds=timeout))
    except BaseException:  # noqa: BLE001 - the parent reports it as this rank's failure
        reports.send_bytes(dumps(Report(rank_, False, traceback.format_exc())))
        return
    environ = dict(os.environ)
    configs = [config.get_config_copy() for config in _configs()]
    reports.send_bytes(dumps(Report(rank_, True, _READY)))
    while True:
        try:
            data = tasks.recv_bytes()
        except EOFError:
            break
        modules = set(sys.modules)
        try:
            fn, args = loads(data)
            report = Report(rank_, True, (detach_result(fn(*args)), _marks()))
            payload = dumps(report)
        except BaseException:  # noqa: BLE001 - every failure must reach the parent as text
            report = Report(rank_, False, traceback.format_exc())
            payload = dumps(report)
        reports.send_bytes(payload)
        if not report.ok:
            break  # the parent ends the pool; peers may be stuck in this call's collectives
        _reset_rank(environ, modules, configs)
    dist.destroy_process_group()


class _Pool:
    """``world`` spawned ranks that run one call after another."""

    def __init__(self, world: int, backend: str) -> None:
        ctx = get_context("spawn")
        port = free_port()
        self.procs: list[BaseProcess] = []
        self.tasks: list[connection.Connection] = []
        self.reports: list[connection.Connection] = []
        self.ready = False
        self.broken = False  # the last call left the ranks out of step: end the pool after it
        for rank_ in range(world):
            task_r, task_w = ctx.Pipe(duplex=False)
            report_r, report_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, name=f"spmd-pool-rank{rank_}", daemon=True,
                               args=(rank_, world, port, backend, GROUP_TIMEOUT_S, task_r, report_w))
            proc.start()
            task_r.close()
            report_w.close()
            self.procs.append(proc)
            self.tasks.append(task_w)
            self.reports.append(report_r)

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        if not self.ready:
            collect(fn, self.procs, self.reports, deadline, timeout)
            self.ready = True
        data = dumps((fn, args))
        for writer in self.tasks:
            writer.send_bytes(data)
        results = collect(fn, self.procs, self.reports, deadline, timeout)
        self.broken = len({marks for _, marks in results}) > 1
        return [result for result, _ in results]

    def close(self) -> None:
        for writer in self.tasks:
            writer.close()
        for proc in self.procs:
            kill(proc)
        for proc in self.procs:
            proc.join()
        for reader in self.reports:
            reader.close()


# Live pools by (world size, backend), least recently used first.
_POOLS: OrderedDict[PoolKey, _Pool] = OrderedDict()


def run_in_pool(fn: Callable[..., Any], world: int, args: tuple[Any, ...], *, timeout: float,
                backend: str) -> list[Any]:
    """``run_spmd``'s pooled path: run ``fn(*args)`` on the pool's ranks; any failure ends the pool."""
    key: PoolKey = (world, backend)
    pool = _POOLS.pop(key, None)
    if pool is None:
        while len(_POOLS) >= MAX_POOLS:
            _POOLS.popitem(last=False)[1].close()
        pool = _Pool(world, backend)
    try:
        results = pool.run(fn, args, timeout)
    except BaseException:
        pool.close()
        raise
    if pool.broken:
        pool.close()
    else:
        _POOLS[key] = pool
    return results


def close_pools() -> None:
    """End every pool (their ranks exit); the next pooled call starts fresh ranks."""
    while _POOLS:
        _POOLS.popitem(last=False)[1].close()


atexit.register(close_pools)
