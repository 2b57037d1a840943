"""Stage policy: which units go to which pipeline stage (the mechanism is ``split.py``).

``balance`` splits a row of unit costs into ``stages`` contiguous runs minimising the
largest run's cost (the pipeline's throughput is set by its slowest stage); ties go to the
split whose stages are most even in unit count. Exact dynamic programming: units are few.
"""

from __future__ import annotations

from ..errors import PlanError


def balance(unit_costs: list[float], stages: int, what: str = "") -> list[int]:
    """Indices of the cut points to use (``stages - 1`` of ``len(unit_costs) - 1``), sorted.

    Cut point ``j`` separates unit ``j`` from unit ``j + 1``.
    """
    units = len(unit_costs)
    if stages < 1:
        raise PlanError(f"pipefusion_parallel_degree must be >= 1, got {stages}")
    if units < stages:
        raise PlanError(
            f"pipefusion_parallel_degree={stages} needs {stages} stages but the graph has only "
            f"{units} block(s) between which it can be cut{' (' + what + ')' if what else ''}: use "
            f"pipefusion_parallel_degree <= {units}, or spend the extra ranks on ulysses_degree/ring_degree"
        )
    prefix = [0.0]
    for c in unit_costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][u]: (max stage cost, spread) of the first u units in s stages; back[s][u]: last cut.
    best = [[(inf, inf)] * (units + 1) for _ in range(stages + 1)]
    back = [[0] * (units + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, stages + 1):
        for u in range(s, units + 1):
            for v in range(s - 1, u):
                prev = best[s - 1][v]
                if prev[0] == inf:
                    continue
                cost = prefix[u] - prefix[v]
                cand = (max(prev[0], cost), max(prev[1], abs((u - v) - units / stages)))
                if cand < best[s][u]:
                    best[s][u], back[s][u] = cand, v
    cuts, u = [], units
    for s in range(stages, 0, -1):
        v = back[s][u]
        if s > 1:
            cuts.append(v - 1)
        u = v
    return sorted(cuts)
