"""run_spmd: results come back in rank order, failures and hangs surface fast and named."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch
import torch.distributed as dist

from xdit_compile.testing import SpmdError, run_spmd


def _rank_payload(scale: float) -> dict[str, object]:
    rank = dist.get_rank()
    ones = torch.ones(3)
    # The all_reduce proves the ranks really share a process group.
    dist.all_reduce(ones)
    base = torch.arange(8.0) * scale + rank
    return {
        "rank": rank, "world": dist.get_world_size(), "sum": ones, "view": base[2:5],
        "env": os.environ.get("XDIT_HARNESS_MARK"),
    }


def _raise_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom from the second rank")
    return dist.get_rank()


def _ranks_block() -> int:
    # Rank 1 waits in a barrier of the pair {1, 2} that rank 2 skips; rank 2 then stays busy
    # (exiting would close its connections and make the barrier fail instead of hang).
    # Rank 0 returns normally.
    pair = dist.new_group([1, 2])
    if dist.get_rank() == 1:
        dist.barrier(group=pair)
    elif dist.get_rank() == 2:
        threading.Event().wait()
    return dist.get_rank()


def test_results_are_in_rank_order_and_tensors_survive() -> None:
    results = run_spmd(_rank_payload, 2, 10.0, env={"XDIT_HARNESS_MARK": "on"})
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["env"] for r in results] == ["on", "on"]
    assert "XDIT_HARNESS_MARK" not in os.environ
    assert all(r["world"] == 2 for r in results)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["sum"], torch.full((3,), 2.0), rtol=0, atol=0)
        torch.testing.assert_close(result["view"], torch.tensor([20.0, 30.0, 40.0]) + rank)


def test_exception_on_one_rank_surfaces_with_traceback() -> None:
    with pytest.raises(SpmdError) as info:
        run_spmd(_raise_on_rank_one, 2, timeout=60.0)
    message = str(info.value)
    assert "rank 1 raised" in message
    assert "ValueError: boom from the second rank" in message
    assert "_raise_on_rank_one" in message  # the frame is in the traceback text


def test_stuck_ranks_are_killed_at_the_timeout_and_named() -> None:
    start = time.monotonic()
    with pytest.raises(SpmdError) as info:
        run_spmd(_ranks_block, 3, timeout=8.0)
    assert time.monotonic() - start < 40.0
    message = str(info.value)
    assert "timed out after 8.0s" in message
    # Rank 0 normally finishes too, but on a loaded machine it may still be starting up.
    stuck = re.search(r"rank\(s\) \[([\d, ]+)\] did not finish", message)
    assert stuck is not None, message
    assert {1, 2} <= {int(r) for r in stuck.group(1).split(",")}


def _rank_one_dies() -> int:
    if dist.get_rank() == 1:
        os._exit(3)
    return dist.get_rank()


def test_rank_that_dies_without_reporting_is_named() -> None:
    with pytest.raises(SpmdError, match="rank 1 exited with code 3 without reporting"):
        run_spmd(_rank_one_dies, 2, timeout=60.0)
