"""The one process-wide context: what the library remembers between compiles and calls.

Everything xdit_compile keeps across calls lives in one ``Context``, reachable as ``current()``;
``reset()`` replaces it with a fresh one (every rank must reset alike: the next compile then creates
its process groups anew, collectively). Nothing else in the package holds mutable module-level state
except registries built at import (``tests/test_architecture.py`` lists and checks them).

    settings            switches; environment variables only seed the defaults (read when used,
                        so a setting left None follows the environment)
    reports             PlanReport of each compiled graph (``xdit_compile.reports()``)
    graphs              (report, per-rank graph, example inputs), when ``settings.keep_graphs``
    warned_breaks       the graph-break WARNING is logged once per context
    pipefusion_reports  PipeFusionReport of each PipeFusion graph (statistics + a weakref to the driver)
    chosen_cuts         PipeFusion's stage cuts per set of weights, reused by later shapes
    groups / world_groups  the process-group cache of ``plan.process_groups`` / ``plan.world_group``,
                        valid for the default group they were built under (``groups_world``)
    pipelines           p2p: peer rank -> (its pipeline's ranks, the wait timeout)
    collective_logs / p2p_logs  the active recorders of ``record_collectives`` / ``record_p2p``
    kv_stores / kv_epoch        the K/V store of the PipeFusion program running now; generation count
    captures            the active ``stream`` capture lists of PipeFusion driver calls
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _env_list(name: str) -> frozenset[str]:
    return frozenset(p.strip() for p in os.environ.get(name, "").split(",") if p.strip())


@dataclass
class Settings:
    """Switches of the library. ``None``: follow the environment variable named in the comment."""

    disabled_passes: frozenset[str] | None = None  # XDIT_DISABLE_PASSES=name,... (names or families)
    strict: bool | None = None  # XDIT_STRICT=1: raise on an internal pass error instead of running replicated
    keep_graphs: bool | None = None  # XDIT_KEEP_GRAPHS=1: keep each per-rank graph (tests, benchmarks)
    log: frozenset[str] | None = None  # XDIT_LOG=plan: log every plan report as it is made
    free_unused_parameters: bool = True  # PipeFusion frees the weights of other stages (pipefusion.configure)

    def passes_off(self) -> frozenset[str]:
        return self.disabled_passes if self.disabled_passes is not None else _env_list("XDIT_DISABLE_PASSES")

    def is_strict(self) -> bool:
        return self.strict if self.strict is not None else _env_flag("XDIT_STRICT")

    def keeps_graphs(self) -> bool:
        return self.keep_graphs if self.keep_graphs is not None else _env_flag("XDIT_KEEP_GRAPHS")

    def logs(self, what: str) -> bool:
        return what in (self.log if self.log is not None else _env_list("XDIT_LOG"))


@dataclass
class Context:
    """What the library keeps between compiles and calls in this process; see the module docstring."""

    settings: Settings = field(default_factory=Settings)
    reports: list[Any] = field(default_factory=list)
    graphs: list[tuple[Any, Any, list[Any]]] = field(default_factory=list)
    warned_breaks: bool = False
    pipefusion_reports: list[Any] = field(default_factory=list)
    chosen_cuts: list[tuple[int, int, frozenset[int], list[int]]] = field(default_factory=list)
    groups: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    world_groups: dict[float | None, Any] = field(default_factory=dict)
    groups_world: Any = None
    pipelines: dict[int, tuple[tuple[int, ...], Any]] = field(default_factory=dict)
    collective_logs: list[list[Any]] = field(default_factory=list)
    p2p_logs: list[list[Any]] = field(default_factory=list)
    kv_stores: list[Any] = field(default_factory=list)
    kv_epoch: int = 0
    captures: list[list[Any]] = field(default_factory=list)
    tp_slices: dict[int, tuple[Any, dict[tuple, Any]]] = field(default_factory=dict)  # tensor_parallel: weight slices cut
    buffers: dict[tuple, Any] = field(default_factory=dict)  # runtime/buffers.py: collective buffers reused by eager calls

    def group_cache(self, world: Any) -> tuple[dict[tuple, dict[str, Any]], dict[float | None, Any]]:
        """(groups, world_groups) built under the default group ``world``; emptied when it changed
        (a process group destroyed and initialised again makes the cached sub-groups invalid)."""
        if self.groups_world is not world:
            self.groups.clear()
            self.world_groups.clear()
            self.groups_world = world
        return self.groups, self.world_groups


_CONTEXT = [Context()]  # the one slot: ``current()`` reads it, ``reset()`` replaces its content


def current() -> Context:
    """This process's context."""
    return _CONTEXT[0]


def reset(settings: Settings | None = None) -> Context:
    """A fresh context (reports, kept graphs, group cache, ...) with ``settings`` (default: fresh ones).

    The K/V generation count goes on, so every PipeFusion program starts a new generation; the
    active recorders and K/V stores (scoped to ``with`` blocks running now) carry over. Call it on
    every rank alike.
    """
    old = _CONTEXT[0]
    _CONTEXT[0] = Context(settings=settings or Settings(), kv_epoch=old.kv_epoch + 1,
                          collective_logs=old.collective_logs, p2p_logs=old.p2p_logs, kv_stores=old.kv_stores,
                          captures=old.captures)
    return _CONTEXT[0]
