"""einsum with ``...`` (RoPE tables as ``einsum("...n,d->...nd", pos, omega)``) and diagonals."""

from __future__ import annotations

import torch

from tests.rules.test_indexing import capture, seeded
from xdit_compile.graph import op_name
from xdit_compile.placements import Shard


def rope_table(pos: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...n,d->...nd", pos, omega).cos()


def test_einsum_ellipsis_keeps_the_token_shard() -> None:
    prop = seeded(capture(rope_table, torch.randn(2, 16), torch.randn(4)), 1)
    (e,) = [n for n in prop.decisions if op_name(n) == "einsum"]
    assert prop.placements[e] == Shard(1, (16,), 1)
    assert not prop.fallbacks


def diagonal(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ii->i", x) + 1


def test_einsum_repeated_label_is_gathered() -> None:
    prop = seeded(capture(diagonal, torch.randn(8, 8)), 0)
    (e,) = [n for n in prop.decisions if op_name(n) == "einsum"]
    assert not isinstance(prop.placements[e], Shard)
