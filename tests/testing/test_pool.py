"""Reused ranks (XDIT_SPMD_REUSE=1): the same processes serve several calls, each call starts from a
fresh rank's state, and a failed call ends the pool instead of leaking into the next call."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from xdit_compile.testing import SpmdError, run_spmd
from xdit_compile.testing import pool


@pytest.fixture(autouse=True)
def _reuse(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(pool.REUSE_ENV, "1")
    pool.close_pools()
    yield
    pool.close_pools()


def _dirty() -> dict[str, object]:
    """Leave behind what a careless test would: an env var, a group, a seed, a dtype, grad off."""
    seen = {"pid": os.getpid(), "mark": os.environ.get("XDIT_POOL_MARK"),
            "groups": len(dist.distributed_c10d._world.pg_map), "draw": torch.rand(2),
            "dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled()}
    os.environ["XDIT_POOL_MARK"] = "left behind"
    dist.new_group(list(range(dist.get_world_size())))
    torch.manual_seed(dist.get_rank())
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    seen["capture"] = torch._dynamo.config.capture_dynamic_output_shape_ops
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return seen


def _fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("pooled boom")
    dist.barrier()  # rank 0 would wait here for ever: the pool must be killed, not reused
    return 0


def test_ranks_are_reused_and_each_call_starts_fresh() -> None:
    first = run_spmd(_dirty, 2, timeout=120.0)
    second = run_spmd(_dirty, 2, timeout=120.0)
    assert [r["pid"] for r in first] == [r["pid"] for r in second]
    for a, b in zip(first, second):
        assert b["mark"] is None and b["groups"] == a["groups"] == 1
        assert b["dtype"] == "torch.float32" and b["grad"] and not b["capture"]
    # The last call seeded each rank differently; the next call starts from one seed on every rank.
    torch.testing.assert_close(second[0]["draw"], second[1]["draw"], rtol=0, atol=0)


def test_a_failed_call_ends_the_pool() -> None:
    before = run_spmd(_dirty, 2, timeout=120.0)
    with pytest.raises(SpmdError, match="rank 1 raised"):
        run_spmd(_fail_on_rank_one, 2, timeout=120.0)
    after = run_spmd(_dirty, 2, timeout=120.0)
    assert {r["pid"] for r in before}.isdisjoint(r["pid"] for r in after)
    assert all(r["mark"] is None for r in after)


def test_env_and_fresh_calls_spawn_their_own_ranks() -> None:
    pooled = run_spmd(_dirty, 2, timeout=120.0)
    fresh = run_spmd(_dirty, 2, timeout=120.0, fresh=True)
    again = run_spmd(_dirty, 2, timeout=120.0)
    assert {r["pid"] for r in pooled}.isdisjoint(r["pid"] for r in fresh)
    assert [r["pid"] for r in pooled] == [r["pid"] for r in again]


def _out_of_step() -> int:
    """Both ranks return, but rank 0 issued one more collective on the default group (as a rank does
    that timed out and caught it): the next call's collectives would pair up wrongly on these ranks."""
    if dist.get_rank() == 0:
        dist.broadcast(torch.ones(1), 0, async_op=True)
    return os.getpid()


def test_ranks_left_out_of_step_are_not_reused() -> None:
    before = run_spmd(_out_of_step, 2, timeout=120.0)
    after = run_spmd(_dirty, 2, timeout=120.0)
    assert set(before).isdisjoint(r["pid"] for r in after)
    again = run_spmd(_dirty, 2, timeout=120.0)
    assert [r["pid"] for r in after] == [r["pid"] for r in again]
