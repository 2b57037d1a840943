"""Ops whose ``dim`` is not their second argument: ``norm(x, p, dim)``, ``normalize(x, p, dim)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from tests.rules.test_indexing import capture, seeded
from xdit_compile.graph import op_name
from xdit_compile.placements import Shard


def norm_over_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2, 1)  # p=2 over dim 1 (the tokens)


def normalize_over_tokens(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, 2.0, 1)


def norm_over_channels(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2, -1, True)


def test_norm_over_the_sharded_dim_is_not_local() -> None:
    for fn, name in ((norm_over_tokens, "norm"), (normalize_over_tokens, "normalize")):
        prop = seeded(capture(fn, torch.randn(2, 8, 4)), 1)
        (node,) = [n for n in prop.decisions if op_name(n) == name]
        assert not isinstance(prop.placements[node], Shard), name  # p must not be read as the dim


def test_norm_over_another_dim_keeps_the_shard() -> None:
    prop = seeded(capture(norm_over_channels, torch.randn(2, 8, 4)), 1)
    (node,) = [n for n in prop.decisions if op_name(n) == "norm"]
    assert prop.placements[node] == Shard(1, (8,), 1)
