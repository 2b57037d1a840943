"""Placement arithmetic: chunks, pieces, uneven splits, the gathered order of segments."""

from __future__ import annotations

from xdit_compile.placements import Shard, chunk_bounds, fmt, global_order, local_sizes, pieces, shard


def test_uneven_chunks_follow_tensor_split() -> None:
    assert [chunk_bounds(9, 2, r) for r in range(2)] == [(0, 5), (5, 9)]
    assert [chunk_bounds(7, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 7)]


def test_segments_are_split_one_by_one() -> None:
    p = Shard(1, (8, 64), 1)  # cat([text 8, image 64])
    assert pieces(p, 2, 0) == ((0, 4), (8, 32))
    assert pieces(p, 2, 1) == ((4, 4), (40, 32))
    assert local_sizes(p, 2) == [36, 36]
    order = global_order(p, 2)
    assert sorted(order) == list(range(72)) and order[:4] == [0, 1, 2, 3] and order[4] == 8


def test_inner_scales_units() -> None:
    p = Shard(2, (8,), 8)  # 8 rows of 8 tokens
    assert pieces(p, 4, 1) == ((16, 16),)
    assert p.length == 64


def test_compact_text() -> None:
    assert str(shard(1, 64)) == "S(1)"
    assert str(Shard(1, (8, 64))) == "S(1:8+64)"
    assert fmt((Shard(0, (4,), 2), None)) == "(S(0:4x2), -)"
