"""Attention with LSE, merging, and Ulysses / ring / USP attention against the single-device
``F.scaled_dot_product_attention`` on the full tensors (fp32, atol 1e-5).

Every rank builds the same full tensors from a per-case seed and slices its shard, so the
reference is exact. The distributed cases are batched into one spawn per world size (plus one
for inductor), and the parametrized tests only look up their case's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from xdit_compile.runtime.attention import (
    AttentionError,
    _math_attention,
    attention_with_lse,
    merge_attention,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from xdit_compile.testing import run_spmd

ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One distributed attention check: which algorithm, shapes, shard sizes, mask kind."""

    name: str
    kind: str  # "ulysses", "ring" or "usp"
    q_sizes: tuple[int, ...]
    kv_sizes: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 4
    mask: str | None = None  # "bool_keys", "bool_full", "add_keys", "add_full"
    by_name: bool = False  # pass the group as its name instead of the object


def _inputs(case: Case, seed: int) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    b, d, sq, sk = 2, 8, sum(case.q_sizes), sum(case.kv_sizes)
    q = torch.randn(b, case.heads, sq, d, generator=g)
    k = torch.randn(b, case.kv_heads, sk, d, generator=g)
    v = torch.randn(b, case.kv_heads, sk, d, generator=g)
    mask = _mask(case.mask, b, case.heads, sq, sk, case.kv_sizes, g)
    return {"q": q, "k": k, "v": v, "mask": mask}


def _mask(kind: str | None, b: int, h: int, sq: int, sk: int, kv_sizes: tuple[int, ...],
          g: torch.Generator) -> torch.Tensor | None:
    if kind is None:
        return None
    shape = (b, 1, 1, sk) if kind.endswith("keys") else (b, h, sq, sk)
    keep = torch.rand(shape, generator=g) > 0.4
    if kind.endswith("full"):
        keep[:, :, 0] = False  # a query row that sees nothing: output 0
        keep[:, :, 1, : kv_sizes[0]] = False  # a row blind to the whole first shard
    else:
        keep[..., : kv_sizes[0]] = False  # batch-wide padding covering a whole shard
        keep[..., -1] = True
    if kind.startswith("bool"):
        return keep
    additive = torch.randn(shape, generator=g)
    return additive.masked_fill(~keep, float("-inf"))


def _shard_q(t: torch.Tensor, sizes: tuple[int, ...], index: int) -> torch.Tensor:
    start = sum(sizes[:index])
    return t.narrow(2, start, sizes[index])


def _slice_queries(mask: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    if mask is None or mask.size(2) == 1:
        return mask
    return mask.narrow(2, start, length)


def _run_case(case: Case, seed: int, groups: dict[str, Any]) -> float:
    """Max abs error of this rank's output shard against the full reference."""
    t = _inputs(case, seed)
    q, k, v, mask = t["q"], t["k"], t["v"], t["mask"]
    gqa = case.heads != case.kv_heads
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    rank = dist.get_rank()

    def group(name: str) -> Any:
        return groups[name].group_name if case.by_name else groups[name]

    common = {"mask": None, "enable_gqa": gqa}
    if case.kind == "ulysses":
        index = dist.get_rank(groups["world"])
        common["mask"] = mask
        got = ulysses_attention(
            _shard_q(q, case.q_sizes, index), _shard_q(k, case.kv_sizes, index),
            _shard_q(v, case.kv_sizes, index), group=group("world"), q_sizes=case.q_sizes,
            kv_sizes=case.kv_sizes, **common,
        )
    elif case.kind == "ring":
        index = rank
        start = sum(case.q_sizes[:index])
        common["mask"] = _slice_queries(mask, start, case.q_sizes[index])
        got = ring_attention(
            _shard_q(q, case.q_sizes, index), _shard_q(k, case.kv_sizes, index),
            _shard_q(v, case.kv_sizes, index), group=group("world"), kv_sizes=case.kv_sizes,
            **common,
        )
    else:
        ulysses = dist.get_world_size(groups["ulysses"])
        index = dist.get_rank(groups["ring"]) * ulysses + dist.get_rank(groups["ulysses"])
        chunk = dist.get_rank(groups["ring"]) * ulysses
        start = sum(case.q_sizes[:chunk])
        length = sum(case.q_sizes[chunk : chunk + ulysses])
        common["mask"] = _slice_queries(mask, start, length)
        got = usp_attention(
            _shard_q(q, case.q_sizes, index), _shard_q(k, case.kv_sizes, index),
            _shard_q(v, case.kv_sizes, index), ulysses_group=group("ulysses"),
            ring_group=group("ring"), q_sizes=case.q_sizes, kv_sizes=case.kv_sizes, **common,
        )
    expected = _shard_q(reference, case.q_sizes, index)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float((got - expected).abs().max()) if got.numel() else 0.0


def _run_cases(cases: list[Case]) -> dict[str, float | str]:
    rank, world = dist.get_rank(), dist.get_world_size()
    groups: dict[str, Any] = {"world": dist.group.WORLD}
    if world == 4:
        # 2 x 2 mesh, sp index = ring_index * 2 + ulysses_index = global rank. Every rank
        # creates every group in the same order.
        ulysses = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        ring = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        groups["ulysses"], groups["ring"] = ulysses[rank // 2], ring[rank % 2]
    results: dict[str, float | str] = {}
    for seed, case in enumerate(cases):
        try:
            results[case.name] = _run_case(case, seed, groups)
        except Exception as error:  # reported per case by the parent
            results[case.name] = f"{type(error).__name__}: {error}"
    return results


UNEVEN_2 = (2 * 3 + 1, 3)  # differ by more than one position, total not divisible by 2
CASES_2 = [
    Case("ulysses_even", "ulysses", (4, 4), (4, 4)),
    Case("ulysses_uneven", "ulysses", UNEVEN_2, UNEVEN_2),
    Case("ulysses_cross_uneven", "ulysses", UNEVEN_2, (2, 5)),
    Case("ulysses_bool_keys", "ulysses", UNEVEN_2, UNEVEN_2, mask="bool_keys"),
    Case("ulysses_bool_full", "ulysses", UNEVEN_2, (2, 5), mask="bool_full"),
    Case("ulysses_add_keys", "ulysses", UNEVEN_2, UNEVEN_2, mask="add_keys"),
    Case("ulysses_add_full", "ulysses", UNEVEN_2, UNEVEN_2, mask="add_full", by_name=True),
    Case("ulysses_gqa", "ulysses", UNEVEN_2, UNEVEN_2, kv_heads=2, mask="bool_full"),
    Case("ring_even", "ring", (4, 4), (4, 4)),
    Case("ring_uneven", "ring", UNEVEN_2, UNEVEN_2),
    Case("ring_cross_uneven", "ring", (3, 6), (5, 1), by_name=True),
    Case("ring_bool_keys", "ring", UNEVEN_2, UNEVEN_2, mask="bool_keys"),
    Case("ring_bool_full", "ring", UNEVEN_2, (2, 5), mask="bool_full"),
    Case("ring_add_keys", "ring", UNEVEN_2, UNEVEN_2, mask="add_keys"),
    Case("ring_add_full", "ring", UNEVEN_2, UNEVEN_2, mask="add_full"),
    Case("ring_gqa", "ring", UNEVEN_2, UNEVEN_2, kv_heads=2, mask="add_full"),
    Case("ring_empty_kv_shard", "ring", (3, 3), (0, 6), mask="bool_full"),
]
UNEVEN_4 = (4, 3, 5, 1)
CASES_4 = [
    Case("ulysses4_uneven", "ulysses", UNEVEN_4, UNEVEN_4, mask="bool_full"),
    Case("ulysses4_gqa", "ulysses", UNEVEN_4, (2, 2, 3, 2), heads=8, kv_heads=4, mask="add_keys"),
    Case("ring4_uneven", "ring", UNEVEN_4, (2, 4, 1, 3), mask="add_full"),
    Case("ring4_gqa", "ring", UNEVEN_4, UNEVEN_4, kv_heads=1, mask="bool_keys"),
    Case("usp_even", "usp", (3, 3, 3, 3), (3, 3, 3, 3)),
    Case("usp_uneven", "usp", UNEVEN_4, UNEVEN_4, by_name=True),
    Case("usp_cross", "usp", UNEVEN_4, (2, 2, 3, 1), mask="bool_full"),
    Case("usp_bool_keys", "usp", UNEVEN_4, UNEVEN_4, mask="bool_keys"),
    Case("usp_add_full", "usp", UNEVEN_4, UNEVEN_4, mask="add_full"),
    Case("usp_add_keys_gqa", "usp", UNEVEN_4, UNEVEN_4, kv_heads=2, mask="add_keys"),
]


@pytest.fixture(scope="module")
def results_2() -> list[dict[str, float | str]]:
    return run_spmd(_run_cases, 2, CASES_2, timeout=120.0)


@pytest.fixture(scope="module")
def results_4() -> list[dict[str, float | str]]:
    return run_spmd(_run_cases, 4, CASES_4, timeout=120.0)


def _assert_case(results: list[dict[str, float | str]], name: str) -> None:
    for rank, result in enumerate(results):
        error = result[name]
        assert not isinstance(error, str), f"rank {rank}: {error}"
        assert error <= ATOL, f"rank {rank}: max abs error {error}"


@pytest.mark.parametrize("name", [c.name for c in CASES_2])
def test_sequence_parallel_attention_2_ranks(results_2: list[dict[str, float | str]], name: str) -> None:
    _assert_case(results_2, name)


@pytest.mark.parametrize("name", [c.name for c in CASES_4])
def test_sequence_parallel_attention_4_ranks(results_4: list[dict[str, float | str]], name: str) -> None:
    _assert_case(results_4, name)


# --------------------------------------------------------------------------------------------
# Compiled


def _compiled_cases() -> dict[str, float]:
    """Ulysses (bool mask) and ring (additive mask, GQA, uneven K/V) in one compiled graph:
    one trace and one inductor compile keep the cold start affordable."""
    world = dist.group.WORLD
    rank = dist.get_rank()
    u_case = Case("compiled_ulysses", "ulysses", UNEVEN_2, UNEVEN_2, mask="bool_full")
    r_case = Case("compiled_ring", "ring", UNEVEN_2, (2, 5), kv_heads=2, mask="add_full")
    u, r = _inputs(u_case, 0), _inputs(r_case, 1)
    r_mask = _slice_queries(r["mask"], sum(r_case.q_sizes[:rank]), r_case.q_sizes[rank])
    args = [
        _shard_q(u["q"], u_case.q_sizes, rank), _shard_q(u["k"], u_case.kv_sizes, rank),
        _shard_q(u["v"], u_case.kv_sizes, rank), u["mask"],
        _shard_q(r["q"], r_case.q_sizes, rank), _shard_q(r["k"], r_case.kv_sizes, rank),
        _shard_q(r["v"], r_case.kv_sizes, rank), r_mask,
    ]

    def both(q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, m1: torch.Tensor,
             q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor,
             m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The process group object for one, its name for the other: both must trace.
        a = ulysses_attention(q1, k1, v1, group=world, q_sizes=UNEVEN_2, kv_sizes=UNEVEN_2,
                              mask=m1)
        b = ring_attention(q2, k2, v2, group=world.group_name, kv_sizes=(2, 5), mask=m2,
                           enable_gqa=True)
        return a * 2, b * 2

    got_u, got_r = torch.compile(both, fullgraph=True, backend="inductor")(*args)
    references = [
        F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["mask"], enable_gqa=gqa)
        for t, gqa in ((u, False), (r, True))
    ]
    return {
        u_case.name: float((got_u / 2 - _shard_q(references[0], UNEVEN_2, rank)).abs().max()),
        r_case.name: float((got_r / 2 - _shard_q(references[1], UNEVEN_2, rank)).abs().max()),
    }


def test_ulysses_and_ring_compile_fullgraph_with_inductor() -> None:
    # One compile thread: on a small machine a worker pool per rank costs more than it saves.
    results = run_spmd(_compiled_cases, 2, timeout=240.0,
                       env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})
    for rank, errors in enumerate(results):
        assert set(errors) == {"compiled_ulysses", "compiled_ring"}
        for name, error in errors.items():
            assert error <= ATOL, f"rank {rank} {name}: max abs error {error}"


# --------------------------------------------------------------------------------------------
# Single process


def _reference_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if q.size(1) != k.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.logsumexp(-1)


@pytest.mark.parametrize("mask_kind", [None, "bool_keys", "bool_full", "add_keys", "add_full"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("kernel", ["dispatch", "math"])
def test_attention_with_lse_matches_sdpa(mask_kind: str | None, kv_heads: int, kernel: str) -> None:
    case = Case("single", "ulysses", (5, 2), (3, 6), kv_heads=kv_heads, mask=mask_kind)
    t = _inputs(case, 7)
    q, k, v, mask = t["q"], t["k"], t["v"], t["mask"]
    gqa = kv_heads != 4
    if kernel == "dispatch":
        out, lse = attention_with_lse(q, k, v, mask, enable_gqa=gqa)
    else:
        out, lse = _math_attention(q, k, v, mask, q.size(-1) ** -0.5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert lse.shape == q.shape[:3]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, _reference_lse(q, k, mask), atol=ATOL, rtol=0)
    if mask_kind == "bool_full":
        assert torch.isneginf(lse[:, :, 0]).all()  # the fully masked row
        assert (out[:, :, 0] == 0).all()


def test_attention_with_lse_scale_and_bfloat16() -> None:
    q, k, v = torch.randn(3, 1, 2, 4, 16).unbind(0)
    out, _ = attention_with_lse(q, k, v, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=ATOL,
                               rtol=0)
    out16, lse16 = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32


def test_attention_with_no_keys_sees_nothing() -> None:
    q = torch.randn(1, 2, 3, 4)
    out, lse = attention_with_lse(q, q[:, :, :0], q[:, :, :0])
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_attention_rejects_mismatched_heads() -> None:
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(AttentionError, match="enable_gqa=True"):
        attention_with_lse(q, kv, kv)


def test_merge_over_disjoint_keys_equals_full_attention() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 2, 4, 5, 8, generator=g).unbind(0)
    mask = torch.rand(2, 4, 5, 5, generator=g) > 0.5
    mask[:, :, 0] = False
    out_a, lse_a = attention_with_lse(q, k[:, :, :2], v[:, :, :2], mask[..., :2])
    out_b, lse_b = attention_with_lse(q, k[:, :, 2:], v[:, :, 2:], mask[..., 2:])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    full_out, full_lse = attention_with_lse(q, k, v, mask)
    torch.testing.assert_close(out, full_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=ATOL, rtol=0)
    assert torch.isneginf(lse[:, :, 0]).all() and (out[:, :, 0] == 0).all()


def test_merge_ignores_dead_block_even_if_its_output_is_nan() -> None:
    out_a, lse_a = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3)
    out_b = torch.full((1, 1, 3, 4), float("nan"))
    lse_b = torch.full((1, 1, 3), float("-inf"))
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    out, lse = merge_attention(out_b, lse_b, out_b, lse_b)
    assert (out == 0).all() and torch.isneginf(lse).all()
