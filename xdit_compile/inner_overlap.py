"""Inductor's compute/communication reordering, switched on for the per-rank graphs only.

The per-rank graphs the backend hands its inner compiler call the runtime's Python functions
(``runtime/attention.py``, ``runtime/redistribute.py``, ...), which are written with torch's
functional collectives; aot_autograd traces them into ``_c10d_functional`` ops
(``all_to_all_single``, ``all_gather_into_tensor``, ``all_reduce``, ``reduce_scatter_tensor``)
each followed by its own ``wait_tensor``. Inductor schedules those as separate nodes, so its
reordering passes can move them: nothing here is opaque to it.

Which passes. Inductor's runtime-based passes (``reorder_communication_preserving_peak_memory``,
``sink_waits_iterative``: torch's recommended list) estimate every node's run time and move
nothing when the estimates say there is nothing to hide; off the GPU every estimate is 0
(``BaseSchedulerNode._get_estimated_runtime``), so on CPU they are no-ops. The greedy passes
need no estimate:

* ``sink_waits``: every ``wait_tensor`` as late as its users allow, so compute that does not
  read a collective's result runs while it is in flight;
* ``raise_comms``: every collective as early as its inputs allow. It schedules collectives in
  their original order (a collective's ancestors take its index as priority), so every rank
  still issues them in the same order, which gloo and NCCL need.

``PASSES`` is used on every device; on a GPU torch's recommended list is the alternative to
measure (``benchmarks/inductor_overlap.py``). The patch goes through ``compile_fx``'s
``config_patches``, which also covers a backward compiled later, and never touches the global
inductor config: the user's other ``torch.compile`` calls are unaffected.

Plan option: ``reorder_comms`` (``ParallelPlan.reorder_comms``). Measured on 2 CPU ranks in
``benchmarks/results/inductor_overlap.md``; docs in ``docs/overlap.md``.
"""

from __future__ import annotations

import re
from typing import Any

PASSES: tuple[str, ...] = ("sink_waits", "raise_comms")


def inductor_patches(reorder_comms: bool) -> dict[str, Any]:
    """The inductor config patch for one inner compile (empty when reordering is off)."""
    if not reorder_comms:
        return {}
    return {"reorder_for_compute_comm_overlap": True, "reorder_for_compute_comm_overlap_passes": list(PASSES)}


_COLLECTIVE = re.compile(r"^(buf\d+) = torch\.ops\._c10d_functional\.(\w+)\.default\(")
_WAIT = re.compile(r"torch\.ops\._c10d_functional\.wait_tensor\.default\((buf\d+)\)")
_KERNEL = re.compile(r"(extern_kernels\.\w+|cpp_fused\w*|triton_\w+|torch\.ops\.aten\.\w+)")


def overlap_slots(code: str) -> list[tuple[str, int]]:
    """For each collective in one inductor-generated module (``run_and_get_code``'s source), in issue
    order: its op name and the number of kernels issued between it and its ``wait_tensor``, i.e. the
    compute that may run while it is in flight. A diagnostic for tests and benchmarks."""
    pending: dict[str, list[Any]] = {}
    done: list[tuple[str, int]] = []
    for line in code.splitlines():
        line = line.strip()
        if line.startswith(("#", "assert_")):
            continue
        if m := _COLLECTIVE.match(line):
            pending[m.group(1)] = [m.group(2), 0]
        elif m := _WAIT.search(line):
            if m.group(1) in pending:
                done.append(tuple(pending.pop(m.group(1))))  # type: ignore[arg-type]
        elif _KERNEL.search(line):
            for entry in pending.values():
                entry[1] += 1
    return done
