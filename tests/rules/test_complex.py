"""Complex views (``view_as_complex`` / ``view_as_real`` / ``polar``): RoPE as complex products.

Numerics of ``complex_rope`` on 2 ranks run with the other in-place/view cases in
``test_indexing.py`` (one spawn for all).
"""

from __future__ import annotations

import torch

from tests.rules.test_indexing import CASES, capture, seeded
from xdit_compile.graph import op_name
from xdit_compile.placements import Shard


def test_complex_views_keep_the_token_shard() -> None:
    fn, inputs = CASES["complex_rope"]
    prop = seeded(capture(fn, *inputs()), 1)
    seen = set()
    for node in prop.decisions:
        if op_name(node) in ("view_as_complex", "view_as_real", "polar"):
            seen.add(op_name(node))
        if op_name(node) in ("view_as_complex", "view_as_real"):
            assert isinstance(prop.placements[node], Shard) and prop.placements[node].dim == 1, node
    assert seen == {"view_as_complex", "view_as_real", "polar"}
    assert not prop.fallbacks


def pair_dim_sharded(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(torch.view_as_complex(x) * 2)


def test_sharded_pair_dim_is_gathered() -> None:
    x = torch.randn(4, 6, 2)
    prop = seeded(capture(pair_dim_sharded, x), 2)  # the (re, im) pair itself split over ranks
    (node,) = [n for n in prop.decisions if op_name(n) == "view_as_complex"]
    assert not isinstance(prop.placements[node], Shard)
    assert any("view_as_complex" in why for _, why in prop.fallbacks)
