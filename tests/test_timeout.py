"""A stuck rank: with the option ``timeout``, the others raise ``CollectiveTimeoutError`` in time.

One ``run_spmd`` of 2 ranks, three cases in turn (a barrier on the default group, which none of
them times out, keeps the ranks in step between cases):

- ``timeout=20``: rank 1 sleeps through a call; rank 0 names itself, the collective, its group's
  ranks and the graph node within 20 s plus slack (``check_inputs=False``, so the first thing
  to wait is a collective inside the graph);
- ``timeout=3``: rank 1 skips a call; rank 0 names the per-call input check;
- ``timeout=3``: rank 1 never compiles; rank 0 names it from the agreement check (last: the
  ranks' agreement rounds are out of step afterwards).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from xdit_compile.testing.harness import run_spmd


def _stuck_rank() -> dict[str, tuple[str, str, float]]:
    import torch.distributed as dist

    import xdit_compile
    from examples.tiny_dits import make

    rank = dist.get_rank()
    out: dict[str, tuple[str, str, float]] = {}

    def case(name: str, options: dict[str, Any], sleep: float, calls_before: int) -> None:
        torch._dynamo.reset()
        model, inputs = make("pixart")
        compiled = torch.compile(model, backend="xdit", dynamic=False,
                                 options={"inner": "eager", "ulysses_degree": 2, **options})
        for _ in range(calls_before):
            compiled(**inputs, return_dict=False)
        if rank == 1:
            time.sleep(sleep)  # stuck: never makes the call rank 0 makes
        else:
            start = time.monotonic()
            try:
                compiled(**inputs, return_dict=False)
                out[name] = ("ok", "", time.monotonic() - start)
            except Exception as e:  # noqa: BLE001 - the case records what it raised
                inner = xdit_compile.unwrap(e)
                out[name] = (type(inner).__name__, str(inner), time.monotonic() - start)
        dist.barrier()

    with torch.no_grad():
        case("in_graph", {"timeout": 20, "check_inputs": False}, 22, 1)
        case("input_check", {"timeout": 3}, 5, 1)
        case("agreement", {"timeout": 3}, 5, 0)
    return out


def test_a_stuck_rank_is_named_within_the_timeout() -> None:
    results = run_spmd(_stuck_rank, 2, timeout=150)
    cases = results[0]
    kind, msg, seconds = cases["in_graph"]
    assert kind == "CollectiveTimeoutError", cases["in_graph"]
    assert 19 < seconds < 28, seconds
    assert "rank 0 timed out after 20 s in all_to_all over the sp group, ranks [0, 1]" in msg, msg
    assert "at graph node '" in msg and "of graph 0" in msg, msg
    kind, msg, seconds = cases["input_check"]
    assert kind == "CollectiveTimeoutError" and 2.5 < seconds < 8, cases["input_check"]
    assert "rank 0 timed out after 3 s in the per-call input check" in msg, msg
    kind, msg, seconds = cases["agreement"]
    assert kind == "CollectiveTimeoutError" and 2.5 < seconds < 8, cases["agreement"]
    assert "rank 0 waited 3 s (timeout 3 s) for rank(s) [1]" in msg, msg
