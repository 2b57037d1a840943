"""attention_kernels: direct calls of flash-attn / xformers kernels (CPU stand-ins registered under
the real op names) and of user-registered kernels become one SDPA node with transposes;
calls that cannot be read as SDPA stay as written with a reason. Graph-level, one process (the
multi-process runs are in tests/models/test_kernel_models.py)."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.fx as fx

import xdit_compile
from xdit_compile.graph import op_name
from xdit_compile.passes.attention_kernels import KernelCall, _key, attention_kernels, registered_attention_kernels
from xdit_compile.testing import kernel_standins
from tests.passes.test_canonical_attention import capture

B, S, HEADS, D = 2, 8, 4, 16


@pytest.fixture(scope="module")
def kernels() -> Iterator[dict[str, Callable[..., Any]]]:
    with kernel_standins.installed() as ok:
        if not ok:
            pytest.skip("the real flash_attn / xformers are installed: stand-ins not used")
        yield {"flash": sys.modules["flash_attn"].flash_attn_func,
               "varlen": sys.modules["flash_attn"].flash_attn_varlen_func,
               "xformers": sys.modules["xformers.ops"].memory_efficient_attention,
               "causal_bias": sys.modules["xformers.ops"].LowerTriangularMask}
    assert "flash_attn" not in sys.modules


def _qkv(seed: int = 0, kv_len: int = S) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, HEADS, D, generator=g), torch.randn(B, kv_len, HEADS, D, generator=g),
            torch.randn(B, kv_len, HEADS, D, generator=g))


def _run(fn: Callable, *args: Any) -> tuple[dict[str, int], fx.GraphModule]:
    gm, ex = capture(fn, *args)
    with torch.no_grad():
        ref = gm(*ex)[0]
        counts = attention_kernels(gm)
        out = gm(*ex)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    return counts, gm


def _sdpa(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if op_name(n) == "scaled_dot_product_attention"]


def _uniform(b: int, s: int) -> torch.Tensor:
    return torch.arange(0, (b + 1) * s, s, dtype=torch.int32)


CASES: dict[str, tuple[str, Callable[..., Any]]] = {
    "flash": ("flash_attn", lambda f, q, k, v: f["flash"](q, k, v)),
    "flash_scale_causal": ("flash_attn", lambda f, q, k, v: f["flash"](q, k, v, softmax_scale=0.3, causal=True)),
    "flash_odd_head_dim": ("flash_attn", lambda f, q, k, v: f["flash"](q[..., :12], k[..., :12], v[..., :12])),
    "flash_cross": ("flash_attn", lambda f, q, k, v: f["flash"](q, k[:, :5], v[:, :5])),
    "varlen_uniform": ("flash_attn_varlen", lambda f, q, k, v: f["varlen"](
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), _uniform(B, S), _uniform(B, S), S, S)),
    "varlen_cross": ("flash_attn_varlen", lambda f, q, k, v: f["varlen"](
        q.flatten(0, 1), k[:, :5].flatten(0, 1), v[:, :5].flatten(0, 1), _uniform(B, S), _uniform(B, 5), S, 5)),
    "xformers": ("xformers_flash", lambda f, q, k, v: f["xformers"](q, k, v)),
    "xformers_causal": ("xformers_flash", lambda f, q, k, v: f["xformers"](q, k, v, attn_bias=f["causal_bias"]())),
    "xformers_bias": ("xformers_cutlass", lambda f, q, k, v: f["xformers"](
        q, k, v, attn_bias=(q[..., :1].transpose(1, 2) * k[..., :1].permute(0, 2, 3, 1)))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_call_becomes_sdpa(kernels: dict, case: str) -> None:
    form, body = CASES[case]
    counts, gm = _run(lambda q, k, v: body(kernels, q, k, v), *_qkv())
    assert counts == {f"attention:{form}": 1}, counts
    (sdpa,) = _sdpa(gm)
    assert sdpa.meta["xdit"]["canonical"] == form
    assert not any(isinstance(n.target, torch._ops.OpOverloadPacket) and n.target._qualified_op_name in
                   registered_attention_kernels() for n in gm.graph.nodes), gm.code


LEFT: dict[str, tuple[str, Callable[..., Any]]] = {
    "window": ("sliding window", lambda f, q, k, v: f["flash"](q, k, v, window_size=(2, 2))),
    "softcap": ("softcap", lambda f, q, k, v: f["flash"](q, k, v, softcap=5.0)),
    "gqa": ("GQA", lambda f, q, k, v: f["flash"](q, k[:, :, :2], v[:, :, :2])),
    "bottom_right_causal": ("bottom-right", lambda f, q, k, v: f["flash"](q, k[:, :5], v[:, :5], causal=True)),
    "lse_read": ("another output", lambda f, q, k, v: sum(
        t.sum() for t in f["flash"](q, k, v, return_attn_probs=True)[:2])[None]),
    "varlen_lengths_differ": ("different lengths", lambda f, q, k, v: f["varlen"](
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), torch.tensor([0, 5, 16], dtype=torch.int32),
        torch.tensor([0, 5, 16], dtype=torch.int32), 11, 11)),
}


@pytest.mark.parametrize("case", list(LEFT))
def test_left_as_written_with_a_reason(kernels: dict, case: str) -> None:
    why, body = LEFT[case]
    counts, gm = _run(lambda q, k, v: body(kernels, q, k, v), *_qkv())
    (key,) = counts
    assert key.startswith("left:") and why in key, counts
    assert not _sdpa(gm)
    node = next(n for n in gm.graph.nodes if "why_replicated" in n.meta.get("xdit", {}))
    assert why in node.meta["xdit"]["why_replicated"]


def test_varlen_lengths_known_only_at_run_time(kernels: dict) -> None:
    q, k, v = _qkv()
    counts, gm = _run(lambda q, k, v, cu: kernels["varlen"](q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                           cu, cu, S, S), q, k, v, _uniform(B, S))
    assert list(counts) == ["left:flash_attn_varlen (cu_seqlens known only at run time (sequence lengths may vary))"]


def test_target_spellings_name_one_key() -> None:
    assert _key("flash_attn::_flash_attn_forward") == _key("torch.ops.flash_attn._flash_attn_forward.default") \
        == "flash_attn::_flash_attn_forward"
    assert _key(torch.ops.aten._efficient_attention_forward) == _key(torch.ops.aten._efficient_attention_forward.default) \
        == "aten::_efficient_attention_forward"


@torch.library.custom_op("xdit_test::head_first_attention", mutates_args=())
def head_first_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0 / temperature)


@head_first_attention.register_fake
def _(q, k, v, temperature):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)


def test_user_registered_kernel() -> None:
    """The public registry: a custom op in SDPA's own layout returning the output itself."""
    def adapter(node: fx.Node, a: dict[str, Any]) -> KernelCall | str:
        if a["temperature"] <= 0:
            return "temperature <= 0"
        return KernelCall(a["q"], a["k"], a["v"], layout="bhsd", scale=1.0 / a["temperature"], output=None)

    xdit_compile.register_attention_kernel(torch.ops.xdit_test.head_first_attention, adapter, form="head_first")
    q, k, v = (t.transpose(1, 2) for t in _qkv())
    counts, gm = _run(lambda q, k, v: torch.ops.xdit_test.head_first_attention(q, k, v, 2.0) + 1, q, k, v)
    assert counts == {"attention:head_first": 1}
    assert _sdpa(gm)[0].kwargs["scale"] == 0.5
    assert "xdit_test::head_first_attention" in registered_attention_kernels()


def test_python_function_kept_whole_in_the_graph(kernels: dict) -> None:
    """``allow_in_graph(flash_attn_func)`` keeps the Python function as the node's target."""
    whole = torch._dynamo.allow_in_graph(functools.wraps(kernels["flash"])(lambda *a, **k: kernels["flash"](*a, **k)))
    gm, _ = capture(lambda q, k, v: whole(q, k, v, softmax_scale=0.2), *_qkv())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [whole], gm.code
    counts, gm = _run(lambda q, k, v: whole(q, k, v, softmax_scale=0.2), *_qkv())
    assert counts == {"attention:flash_attn": 1}
    assert _sdpa(gm)[0].kwargs["scale"] == 0.2
