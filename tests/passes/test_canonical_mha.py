"""canonical_mha: ``nn.MultiheadAttention`` (one ``multi_head_attention_forward`` node in Dynamo's
graph) becomes linears + one SDPA that ``recognise`` sees; calls it cannot decompose stay as
written with a reason. Graph-level, one process (the multi-process runs are in
tests/models/test_kernel_models.py)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from xdit_compile.graph import op_name
from xdit_compile.passes.canonical_mha import canonical_mha
from xdit_compile.passes.recognise import recognise
from tests.passes.test_canonical_attention import capture

E, H, L, S, N = 16, 4, 6, 5, 2


def _count(gm: fx.GraphModule, name: str) -> int:
    return sum(op_name(n) == name for n in gm.graph.nodes)


def _rewrite_and_compare(fn: Callable, *args: Any) -> tuple[dict[str, int], fx.GraphModule]:
    gm, ex = capture(fn, *args)
    assert sum(n.target is F.multi_head_attention_forward for n in gm.graph.nodes) == 1, gm.code
    with torch.no_grad():
        ref = gm(*ex)[0]
        counts = canonical_mha(gm)
        out = gm(*ex)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    return counts, gm


def _masks(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[-1, -2:] = True
    drop = torch.rand(L, S, generator=g) > 0.7
    drop[:, 0] = False  # no fully masked row (NaN in both forms)
    return {
        "none": {},
        "attn_bool": {"attn_mask": drop},
        "attn_float": {"attn_mask": torch.randn(L, S, generator=g)},
        "attn_float_3d": {"attn_mask": torch.randn(N * H, L, S, generator=g)},
        "kpm_bool": {"key_padding_mask": pad},
        "kpm_float": {"key_padding_mask": torch.zeros(N, S).masked_fill(pad, -1e4)},
        "both_bool": {"attn_mask": drop, "key_padding_mask": pad},
        "both_float": {"attn_mask": torch.randn(L, S, generator=g), "key_padding_mask": torch.zeros(N, S).masked_fill(pad, -1e4)},
    }[kind]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["none", "attn_bool", "attn_float", "attn_float_3d", "kpm_bool", "kpm_float",
                                  "both_bool", "both_float"])
def test_cross_attention_with_masks_becomes_sdpa(batch_first: bool, kind: str) -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    masks = _masks(kind)
    names = list(masks)
    q = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    kv = torch.randn(N, S, E) if batch_first else torch.randn(S, N, E)

    def f(q: torch.Tensor, kv: torch.Tensor, *ms: torch.Tensor) -> torch.Tensor:
        return m(q, kv, kv, need_weights=False, **dict(zip(names, ms)))[0]

    counts, gm = _rewrite_and_compare(f, q, kv, *masks.values())
    assert counts == {"attention:mha": 1}
    assert _count(gm, "multi_head_attention_forward") == 0 and _count(gm, "scaled_dot_product_attention") == 1
    sdpa = next(n for n in gm.graph.nodes if op_name(n) == "scaled_dot_product_attention")
    assert sdpa.meta["xdit"]["canonical"] == "mha"
    assert recognise(gm).get("attention:cross") == 1


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_uses_one_fused_projection(batch_first: bool) -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=False).eval()
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    counts, gm = _rewrite_and_compare(lambda x: m(x, x, x, need_weights=False)[0], x)
    assert counts == {"attention:mha": 1}
    assert _count(gm, "linear") == 2 and _count(gm, "chunk") == 1  # in- and out-projection
    assert recognise(gm).get("attention:self") == 1


def test_separate_projection_weights() -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=True, kdim=8, vdim=12).eval()
    counts, gm = _rewrite_and_compare(lambda x, k, v: m(x, k, v, need_weights=False)[0],
                                      torch.randn(N, L, E), torch.randn(N, S, 8), torch.randn(N, S, 12))
    assert counts == {"attention:mha_separate_proj": 1}
    assert _count(gm, "linear") == 4


@pytest.mark.parametrize("case, why", [
    ("need_weights", "need_weights=True"),
    ("bias_kv", "bias_k / bias_v / add_zero_attn"),
    ("zero_attn", "bias_k / bias_v / add_zero_attn"),
])
def test_left_as_written_with_a_reason(case: str, why: str) -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=case == "bias_kv",
                               add_zero_attn=case == "zero_attn").eval()
    x = torch.randn(N, L, E)
    gm, ex = capture(lambda x: m(x, x, x, need_weights=case == "need_weights")[0], x)
    counts = canonical_mha(gm)
    (key,) = counts
    assert key.startswith("left:mha (") and why in key, counts
    node = next(n for n in gm.graph.nodes if n.target is F.multi_head_attention_forward)
    assert why in node.meta["xdit"]["why_replicated"]
    assert _count(gm, "scaled_dot_product_attention") == 0
