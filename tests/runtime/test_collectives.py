"""Collectives on real gloo ranks: uneven sizes, both all-to-all directions, ring shifts,
sums, the byte recorder and the error messages. Exact checks (integers in float tensors).

All cases run inside one 4-rank spawn (process start-up dominates the cost); subgroups of
two ranks cover the size-2 case and group names given as strings.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from xdit_compile.errors import CollectiveError
from xdit_compile.runtime.collectives import (
    CollectiveRecord,
    all_gather,
    all_reduce,
    all_to_all,
    record_collectives,
    shift,
)
from xdit_compile.testing import run_spmd

WORLD = 4
SEQ = [3, 1, 4, 0]  # uneven on purpose, including an empty shard


def _shard(rank: int, length: int, heads: int = 4, tag: float = 0.0) -> torch.Tensor:
    """A [2, heads, length, 3] tensor whose values encode (rank, head, position, feature)."""
    b, h, s, d = torch.meshgrid(
        torch.arange(2), torch.arange(heads), torch.arange(length), torch.arange(3), indexing="ij"
    )
    return (1000 * rank + 100 * h + 10 * s + d + 10000 * b + tag).float()


def _full(sizes: list[int], heads: int = 4) -> torch.Tensor:
    return torch.cat([_shard(r, n, heads) for r, n in enumerate(sizes)], dim=2)


def _error_text(fn: Any, *args: Any, **kwargs: Any) -> str:
    try:
        fn(*args, **kwargs)
    except CollectiveError as error:
        return str(error)
    return "no error"


def _collective_cases() -> dict[str, Any]:
    rank = dist.get_rank()
    world = dist.group.WORLD
    # Every rank creates every subgroup, in the same order.
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair = pairs[rank % 2]
    pair_rank = rank // 2
    out: dict[str, Any] = {}

    x = _shard(rank, SEQ[rank])
    out["all_gather_uneven_dim2"] = torch.equal(all_gather(x, 2, SEQ, world), _full(SEQ))
    out["all_gather_negative_dim"] = torch.equal(all_gather(x, -2, SEQ, world), _full(SEQ))
    even = _shard(rank, 2)
    out["all_gather_even_dim2"] = torch.equal(all_gather(even, 2, [2] * 4, world), _full([2] * 4))
    rows = torch.full((rank + 1, 2), float(rank))
    out["all_gather_uneven_dim0"] = torch.equal(
        all_gather(rows, 0, [1, 2, 3, 4], world),
        torch.cat([torch.full((r + 1, 2), float(r)) for r in range(4)]),
    )
    pair_sizes = [2, 5]
    gathered = all_gather(_shard(rank, pair_sizes[pair_rank]), 2, pair_sizes, pair.group_name)
    members = [rank % 2, rank % 2 + 2]
    expected = torch.cat([_shard(m, n) for m, n in zip(members, pair_sizes)], dim=2)
    out["all_gather_subgroup_by_name"] = torch.equal(gathered, expected)

    # Ulysses out: heads scattered, uneven sequence gathered; then back.
    heads_out = all_to_all(x, 1, 2, world, gather_sizes=SEQ)
    out["all_to_all_heads_to_seq"] = torch.equal(heads_out, _full(SEQ)[:, rank : rank + 1])
    back = all_to_all(heads_out, 2, 1, world, scatter_sizes=SEQ)
    out["all_to_all_seq_to_heads"] = torch.equal(back, x)
    pair_x = _shard(rank, 3, heads=2)
    pair_out = all_to_all(pair_x, 1, 2, pair)
    pair_full = torch.cat([_shard(m, 3, heads=2) for m in members], dim=2)
    out["all_to_all_even_subgroup"] = torch.equal(pair_out, pair_full[:, pair_rank : pair_rank + 1])
    out["all_to_all_even_back"] = torch.equal(all_to_all(pair_out, 2, 1, pair), pair_x)

    out["all_reduce"] = torch.equal(all_reduce(torch.full((2, 3), float(rank)), world),
                                    torch.full((2, 3), 6.0))
    for offset in (1, -1, 2, 4):
        got = shift(_shard(rank, 2), offset, world)
        out[f"shift_{offset}"] = torch.equal(got, _shard((rank - offset) % WORLD, 2))
    out["shift_subgroup"] = torch.equal(shift(_shard(rank, 2), 1, pair), _shard(members[1 - pair_rank], 2))

    with record_collectives() as log:
        all_gather(x, 2, SEQ, world)  # padded to 4 positions: 2*4*4*3 floats
        all_to_all(x, 1, 2, world, gather_sizes=SEQ)  # the whole shard
        all_reduce(torch.zeros(5, dtype=torch.float16), world)
        shift(torch.zeros(7, dtype=torch.int64), 1, pair)
    out["recorder"] = log
    out["recorder_stopped"] = _recorded_after_exit(world)

    out["error_not_divisible"] = _error_text(all_to_all, torch.zeros(1, 3, 2, 1), 1, 2, world)
    out["error_wrong_local_size"] = _error_text(all_gather, x, 2, [9, 9, 9, 9], world)
    out["error_size_count"] = _error_text(all_gather, x, 2, [1, 2], world)
    out["error_scatter_sum"] = _error_text(all_to_all, x, 1, 2, world, [1, 1, 1, 2], SEQ)
    return out


def _recorded_after_exit(group: dist.ProcessGroup) -> int:
    with record_collectives() as log:
        pass
    all_reduce(torch.zeros(1), group)
    return len(log)


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_spmd(_collective_cases, WORLD, timeout=120.0)


@pytest.mark.parametrize(
    "case",
    [
        "all_gather_uneven_dim2", "all_gather_negative_dim", "all_gather_even_dim2",
        "all_gather_uneven_dim0", "all_gather_subgroup_by_name", "all_to_all_heads_to_seq",
        "all_to_all_seq_to_heads", "all_to_all_even_subgroup", "all_to_all_even_back",
        "all_reduce", "shift_1", "shift_-1", "shift_2", "shift_4", "shift_subgroup",
    ],
)
def test_collective_matches_reference_on_every_rank(results: list[dict[str, Any]], case: str) -> None:
    assert [r[case] for r in results] == [True] * WORLD


def test_recorder_counts_bytes_handed_to_each_collective(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        shard_bytes = 2 * 4 * SEQ[rank] * 3 * 4
        assert result["recorder"] == [
            ("all_gather", 2 * 4 * max(SEQ) * 3 * 4, 4),
            ("all_to_all", shard_bytes, 4),
            ("all_reduce", 5 * 2, 4),
            ("shift", 7 * 8, 2),
        ]
        assert all(isinstance(r, CollectiveRecord) for r in result["recorder"])
        assert result["recorder_stopped"] == 0


def test_bad_inputs_raise_clear_errors(results: list[dict[str, Any]]) -> None:
    messages = results[0]
    assert "all_to_all" in messages["error_not_divisible"]
    assert "not divisible by the group size 4" in messages["error_not_divisible"]
    assert "(1, 3, 2, 1)" in messages["error_not_divisible"]
    assert "sizes[0] = 9" in messages["error_wrong_local_size"]
    assert "2 entries but the group has 4 ranks" in messages["error_size_count"]
    assert "sums to 5" in messages["error_scatter_sum"]
