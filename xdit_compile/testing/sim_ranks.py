"""Simulated ranks in one process: one thread per rank over torch's threaded process group.

The rule validator (:mod:`xdit_compile.testing.validate_rules`) runs every rank's lowered
program here, so the real runtime collectives (gathers, all-reduces, halo exchanges,
GroupNorm statistics, Ulysses and Ring attention) run unchanged, with every rank's values,
and nothing is spawned. Each rank thread has its own default group (the C++ name registry
is made thread-local), plus one single-rank group per rank, which stands for "another mesh
axis" in runtime ops met again on a second axis.

    with SimWorld(2) as world:
        outs = world.run([lambda: program_0(x), lambda: program_1(x)])   # one result per rank

A rank that raises wakes the others out of their collectives, so a wrong program never hangs:
``run`` returns the exception in that rank's slot, and the world stays usable.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.multi_threaded_pg import (
    ProcessLocalGroup, _install_threaded_pg, _uninstall_threaded_pg,
)

from ..errors import CollectiveError

_STOP = object()
# After the first rank finishes, the others get this long to finish too; a rank still
# blocked then waits for a collective its peers never issued (the programs disagree).
_STRAGGLER_S = 5.0

_installed = 0
_install_lock = threading.Lock()


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed == 0:
            torch._C._distributed_c10d._set_thread_isolation_mode(True)
            _install_threaded_pg()
        _installed += 1


def _uninstall() -> None:
    global _installed
    with _install_lock:
        _installed -= 1
        if _installed == 0:
            _uninstall_threaded_pg()
            torch._C._distributed_c10d._set_thread_isolation_mode(False)


class SimWorld:
    """``n`` rank threads sharing one threaded process group (see the module docstring).

    ``group`` is the name of the n-rank group (the same on every rank); ``single(r)`` the
    name of rank r's single-rank group, valid inside rank r's thread only.
    """

    def __init__(self, n: int):
        self.n = n
        self.group = ""
        self._singles: dict[int, str] = {}
        self._jobs: list[queue.Queue] = [queue.Queue() for _ in range(n)]
        self._done: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        _install()
        store = dist.HashStore()
        ready: queue.Queue = queue.Queue()
        for r in range(n):
            t = threading.Thread(target=self._loop, args=(r, store, ready), daemon=True, name=f"xdit-sim-rank{r}")
            t.start()
            self._threads.append(t)
        for _ in range(n):
            r, name, single = ready.get(timeout=60)
            if isinstance(name, BaseException):
                raise CollectiveError(f"simulated rank {r} of {n} could not join the threaded group: {name}")
            self.group = name
            self._singles[r] = single

    def single(self, rank: int) -> str:
        return self._singles[rank]

    def _loop(self, r: int, store: dist.Store, ready: queue.Queue) -> None:
        try:
            dist.init_process_group("threaded", rank=r, world_size=self.n, store=store)
            singles = [dist.new_group([i]) for i in range(self.n)]
            ready.put((r, dist.group.WORLD.group_name, singles[r].group_name))
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            ready.put((r, exc, None))
            return
        while True:
            job = self._jobs[r].get()
            if job is _STOP:
                dist.destroy_process_group()
                return
            try:
                out: Any = job()
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: a peer's failure woke us
                out = exc
            self._done.put((r, out))

    def run(self, jobs: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
        """Run ``jobs[r]`` on rank r; each slot holds the result or the exception raised."""
        if len(jobs) != self.n:
            raise CollectiveError(f"SimWorld.run got {len(jobs)} jobs for {self.n} ranks; pass one per rank")
        for r, job in enumerate(jobs):
            self._jobs[r].put(job)
        results: list[Any] = [None] * self.n
        pending = set(range(self.n))
        failed = False
        wait = timeout
        while pending:
            try:
                r, out = self._done.get(timeout=wait)
            except queue.Empty:
                # Peers blocked in a collective nobody else will join: wake them.
                failed = True
                ProcessLocalGroup.exception_handle(
                    CollectiveError(f"simulated ranks {sorted(pending)} of {self.n} stuck in a collective"))
                wait = timeout
                continue
            pending.discard(r)
            results[r] = out
            wait = _STRAGGLER_S
            if isinstance(out, BaseException) and not failed:
                failed = True
                ProcessLocalGroup.exception_handle(out)
        if failed:
            ProcessLocalGroup.reset()
            for r in range(self.n):
                if isinstance(results[r], SystemExit):
                    results[r] = CollectiveError(
                        f"simulated rank {r} of {self.n} was waiting in a collective when a peer failed or stopped")
        return results

    def close(self) -> None:
        for q in self._jobs:
            q.put(_STOP)
        for t in self._threads:
            t.join(timeout=10)
        _uninstall()

    def __enter__(self) -> "SimWorld":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
