"""Concatenation along a shard whose unit size the other inputs cannot use, and pad_sequence."""

from __future__ import annotations

import torch

from tests.rules.test_indexing import capture, seeded
from xdit_compile.graph import op_name
from xdit_compile.placements import Shard


def joint_after_patches(grid: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    img = grid.flatten(1, 2)  # rows of 4 tokens: S(1:4x4)
    return torch.cat([txt, img], dim=1) * 2  # 6 text tokens are not whole rows


def test_cat_falls_back_to_single_tokens() -> None:
    prop = seeded(capture(joint_after_patches, torch.randn(2, 4, 4, 8), torch.randn(2, 6, 8)), 1)
    (cat,) = [n for n in prop.decisions if op_name(n) == "cat"]
    assert prop.placements[cat] == Shard(1, (6, 16), 1)
    assert not prop.fallbacks


def padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([a, b], batch_first=True) + 1


def test_pad_sequence_of_equal_lengths_keeps_the_shard() -> None:
    prop = seeded(capture(padded, torch.randn(8, 4), torch.randn(8, 4)), 0)
    (pad,) = [n for n in prop.decisions if op_name(n) == "pad_sequence"]
    assert prop.placements[pad] == Shard(1, (8,), 1)
    assert not prop.fallbacks


def test_pad_sequence_of_unequal_lengths_is_gathered() -> None:
    prop = seeded(capture(padded, torch.randn(8, 4), torch.randn(5, 4)), 0)
    (pad,) = [n for n in prop.decisions if op_name(n) == "pad_sequence"]
    assert not isinstance(prop.placements[pad], Shard)
    assert any("pad_sequence" in why for _, why in prop.fallbacks)


def test_pad_sequence_off_the_sequence_dim() -> None:
    prop = seeded(capture(padded, torch.randn(8, 4), torch.randn(5, 4)), 1)
    (pad,) = [n for n in prop.decisions if op_name(n) == "pad_sequence"]
    assert prop.placements[pad] == Shard(2, (4,), 1)


