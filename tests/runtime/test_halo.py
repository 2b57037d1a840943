"""Halo exchange and global GroupNorm on real gloo ranks (``runtime/halo.py``).

Exact checks: a rank's haloed shard must equal the matching rows of the zero-padded full
tensor; GroupNorm on shards, gathered, must equal ``F.group_norm`` of the full tensor (float32
sums: within 1e-5); a rank's shard of a sharded roll must equal its rows of ``torch.roll`` of
the full tensor (also its gradient). All cases run in one 3-rank spawn with uneven shards (rows 3, 2, 2), plus
one 2-rank subgroup case; one case is compiled with ``fullgraph=True`` to prove traceability.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from xdit_compile.errors import CollectiveError
from xdit_compile.placements import chunk_bounds
from xdit_compile.runtime.collectives import record_collectives
from xdit_compile.runtime.halo import group_norm, halo_exchange, roll_exchange
from xdit_compile.testing import run_spmd

WORLD = 3


def _full(rows: int, dim: int) -> torch.Tensor:
    shape = [2, 3, 5, 4]
    shape[dim] = rows
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape) + 1.0


def _mine(x: torch.Tensor, dim: int, n: int, rank: int) -> torch.Tensor:
    lo, hi = chunk_bounds(x.size(dim), n, rank)
    return x.narrow(dim, lo, hi - lo)


def _padded_rows(x: torch.Tensor, dim: int, before: int, after: int, n: int, rank: int) -> torch.Tensor:
    """What ``halo_exchange`` must return: rows [lo - before, hi + after) of x zero-padded."""
    pad_shape = list(x.shape)
    pad_shape[dim] = max(before, after)
    pad = x.new_zeros(pad_shape)
    big = torch.cat([pad, x, pad], dim=dim)
    lo, hi = chunk_bounds(x.size(dim), n, rank)
    start = lo - before + pad_shape[dim]
    return big.narrow(dim, start, hi - lo + before + after)


def _cases() -> dict[str, Any]:
    rank, n = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name
    out: dict[str, Any] = {}
    for dim, rows in ((2, 7), (3, 6)):
        x = _full(rows, dim)
        for before, after in ((1, 1), (2, 0), (0, 1), (2, 2), (0, 0)):
            got = halo_exchange(_mine(x, dim, n, rank), dim, before, after, group)
            want = _padded_rows(x, dim, before, after, n, rank)
            out[f"halo dim{dim} {before}+{after}"] = float((got - want).abs().max()) if got.shape == want.shape else -1.0
    # A 2-rank subgroup (ranks 0 and 2) addressed by its name: neighbours are group ranks.
    sub = dist.new_group([0, 2])
    if rank in (0, 2):
        me = 0 if rank == 0 else 1
        x = _full(4, 2)
        got = halo_exchange(_mine(x, 2, 2, me), 2, 1, 1, sub.group_name)
        out["halo subgroup"] = float((got - _padded_rows(x, 2, 1, 1, 2, me)).abs().max())
    # Bytes: one all_to_all per exchange; each rank sends its head and/or its tail.
    x = _full(7, 2)
    with record_collectives() as log:
        halo_exchange(_mine(x, 2, n, rank), 2, 1, 1, group)
    out["records"] = [(r.kind, r.nbytes) for r in log]
    # GroupNorm with global statistics, on a shard of dim 2 and of dim 3, with an offset mean.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 7, 6, generator=g) * 3.0 + 5.0
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    ref = F.group_norm(x, 4, w, b, 1e-6)
    for dim in (2, 3):
        local = group_norm(_mine(x, dim, n, rank), 4, w, b, 1e-6, 2 * 7 * 6, group)
        out[f"group_norm dim{dim}"] = float((local - _mine(ref, dim, n, rank)).abs().max())
    local = group_norm(_mine(x, 2, n, rank), 4, None, None, 1e-6, 2 * 7 * 6, group)
    out["group_norm no affine"] = float((local - _mine(F.group_norm(x, 4, eps=1e-6), 2, n, rank)).abs().max())
    # Traceable: the same exchange and norm inside torch.compile(fullgraph=True).
    x = _full(7, 2)

    def both(t: torch.Tensor) -> torch.Tensor:
        return group_norm(halo_exchange(t, 2, 1, 1, group), 3, None, None, 1e-5, 9 * 4, group)

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    out["compiled"] = float((compiled(_mine(x, 2, n, rank)) - both(_mine(x, 2, n, rank))).abs().max())
    # Roll along the sharded dim (7 rows: 3 + 2 + 2): any shift, forward and backward, and traced.
    x = _full(7, 2)
    sizes = [len(range(*chunk_bounds(7, n, r))) for r in range(n)]
    for shift in (1, 2, -1, -3, 5, 7, 16, 0):
        got = roll_exchange(_mine(x, 2, n, rank), 2, shift, sizes, group)
        out[f"roll {shift}"] = float((got - _mine(torch.roll(x, shift, 2), 2, n, rank)).abs().max())
    small = _full(2, 2)  # 2 rows on 3 ranks: rank 2 holds none and still takes part
    got = roll_exchange(_mine(small, 2, n, rank), 2, 1, [1, 1, 0], group)
    out["roll empty rank"] = 0.0 if torch.equal(got, _mine(torch.roll(small, 1, 2), 2, n, rank)) else 1.0
    w = _full(7, 2).sin()
    mine = _mine(x, 2, n, rank).clone().requires_grad_(True)
    (roll_exchange(mine, 2, 3, sizes, group) * _mine(w, 2, n, rank)).sum().backward()
    out["roll grad"] = float((mine.grad - _mine(torch.roll(w, -3, 2), 2, n, rank)).abs().max())
    rolled = torch.compile(lambda t: roll_exchange(t, 2, -2, sizes, group) * 2, backend="aot_eager", fullgraph=True)
    out["roll compiled"] = float((rolled(_mine(x, 2, n, rank)) - 2 * _mine(torch.roll(x, -2, 2), 2, n, rank)).abs().max())
    with record_collectives() as log:
        roll_exchange(_mine(x, 2, n, rank), 2, 1, sizes, group)
    out["roll records"] = [(r.kind, r.nbytes) for r in log]
    # Errors name the problem.
    try:
        halo_exchange(_mine(_full(3, 2), 2, n, rank), 2, 2, 2, group)
        out["too deep"] = "no error"
    except CollectiveError as e:
        out["too deep"] = str(e)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_spmd(_cases, WORLD, timeout=180.0)


def test_halo_rows_equal_zero_padded_full_tensor(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        for key, err in r.items():
            if key.startswith("halo"):
                assert err == 0.0, f"rank {rank} {key}: error {err} (-1 means wrong shape)"
    assert "halo subgroup" in results[0] and "halo subgroup" in results[2]


def test_group_norm_uses_global_statistics(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        for key in ("group_norm dim2", "group_norm dim3", "group_norm no affine"):
            assert r[key] < 1e-5, f"rank {rank} {key}: {r[key]}"


def test_halo_is_one_all_to_all_carrying_only_boundary_rows(results: list[dict[str, Any]]) -> None:
    row = 2 * 3 * 4 * 4  # one row of [2, 3, *, 4] float32
    # Edge ranks send one row (to their only neighbour), the middle rank two.
    assert [r["records"] for r in results] == [[("halo", row)], [("halo", 2 * row)], [("halo", row)]]


def test_halo_and_group_norm_trace_fullgraph(results: list[dict[str, Any]]) -> None:
    assert all(r["compiled"] < 1e-5 for r in results)


def test_too_deep_halo_is_a_clear_error(results: list[dict[str, Any]]) -> None:
    assert "halo needs 2" in results[1]["too deep"]


def test_roll_exchange_equals_roll_of_the_full_tensor(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        for key, err in r.items():
            if key.startswith("roll ") and key != "roll records":
                assert err == 0.0, f"rank {rank} {key}: error {err}"
    # Shift 1: each rank sends only its last row to the next rank.
    row = 2 * 3 * 4 * 4
    assert [r["roll records"] for r in results] == [[("roll", row)]] * WORLD
