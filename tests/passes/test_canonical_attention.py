"""canonical_attention: spelled-out attention becomes one SDPA node (captured graphs), and is
then lowered to Ulysses / Ring on 2 ranks like any SDPA (one spawn)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_compile.graph import op_name
from xdit_compile.passes.canonical_attention import canonical_attention
from xdit_compile.testing.harness import run_spmd

B, H, S, D = 2, 2, 8, 4
SCALE = 1 / math.sqrt(D)


def capture(fn: Callable, *args: Any) -> tuple[fx.GraphModule, list[Any]]:
    """Dynamo's graph of ``fn`` and its example inputs (placeholders in Dynamo's order), traced
    under ``no_grad`` as inference runs it."""
    graphs = []
    with torch.no_grad():
        torch.compile(fn, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward, fullgraph=True)(*args)
    torch._dynamo.reset()
    return graphs[0]


def _sdpa_count(gm: fx.GraphModule) -> int:
    return sum(op_name(n) == "scaled_dot_product_attention" for n in gm.graph.nodes)


# ---------------------------------------------------------------- forms that are rewritten
def matmul_scale_after(q, k, v):
    attn = (q @ k.transpose(-2, -1)) * SCALE
    attn = attn.softmax(dim=-1)
    return attn @ v


def matmul_scale_before_float_softmax(q, k, v, mask):
    s = torch.matmul(q * SCALE, k.transpose(2, 3)) + mask
    p = F.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(F.dropout(p, 0.1, training=False), v)


def einsum_additive(q, k, v, mask):
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    s = mask + s
    return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


def einsum_3d_masked_fill(q, k, v, keep):
    # CompVis LDM: heads folded into the batch, boolean mask, a huge negative fill
    qf, kf, vf = (t.flatten(0, 1) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", qf, kf) * SCALE
    sim = sim.masked_fill(~keep.flatten(0, 1), -torch.finfo(sim.dtype).max)
    return torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), vf)


def baddbmm_form(q, k, v, keep):
    qf, kf, vf = (t.flatten(0, 1) for t in (q, k, v))
    s = torch.baddbmm(torch.empty(qf.shape[0], qf.shape[1], kf.shape[1]), qf, kf.transpose(-1, -2),
                      beta=0, alpha=SCALE)
    s = s.masked_fill(~keep.flatten(0, 1), float("-inf"))
    return torch.bmm(s.softmax(-1, dtype=torch.float32), vf)


def baddbmm_bias(q, k, v, mask):
    qf, kf, vf = (t.flatten(0, 1) for t in (q, k, v))
    s = torch.baddbmm(mask.expand(B, H, S, S).flatten(0, 1), qf, kf.transpose(1, 2), beta=1, alpha=SCALE)
    return torch.bmm(torch.softmax(s, -1), vf)


def pretransposed_k(q, k, v):
    kt = k.permute(0, 1, 3, 2)  # k already laid out [B, H, D, S]
    return (q @ kt * SCALE).softmax(-1) @ v


def inplace_fill_compvis(q, k, v, keep):
    # CompVis LDM: the scaled scores are filled in place with the most negative finite value
    qf, kf, vf = (t.flatten(0, 1) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", qf, kf) * SCALE
    sim.masked_fill_(~keep.flatten(0, 1), -torch.finfo(sim.dtype).max)
    return torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), vf)


def inplace_fill_inf(q, k, v, keep):
    s = q @ k.transpose(-2, -1)
    s.masked_fill_(~keep, float("-inf"))
    return (s * SCALE).softmax(-1) @ v


# ---------------------------------------------------------------- forms left alone
def scores_used_elsewhere(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    return s.softmax(-1) @ v + s.mean()


def softmax_other_dim(q, k, v):
    return (q @ k.transpose(-2, -1) * SCALE).softmax(-2) @ v


def causal_from_scores(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    s = s.masked_fill(s.tril() == 0, float("-inf"))  # a mask computed from the scores themselves
    return s.softmax(-1) @ v


def probabilities_returned(q, k, v):
    p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1)
    return p @ v, p


def inplace_fill(q, k, v, keep):
    s = q @ k.transpose(-2, -1)
    s.masked_fill_(~keep, -1e9)  # too moderate a fill, as below
    return s.softmax(-1) @ v


def inplace_fill_after_read(q, k, v, keep):
    s = q @ k.transpose(-2, -1) * SCALE
    p = s.softmax(-1)
    s.masked_fill_(~keep, float("-inf"))  # after the softmax read: not a mask of this attention
    return p @ v


def inplace_fill_before_scale(q, k, v, keep):
    s = q @ k.transpose(-2, -1)
    s.masked_fill_(~keep, -3e38)  # a finite fill the scale would change
    return (s * SCALE).softmax(-1) @ v


def moderate_fill(q, k, v, keep):
    # -1e9 does not swallow the scores in float32, so a fully masked row would differ: left alone
    return (q @ k.transpose(-2, -1)).masked_fill(~keep, -1e9).softmax(-1) @ v


def scale_after_mask(q, k, v, mask):
    return ((q @ k.transpose(-2, -1) + mask) * SCALE).softmax(-1) @ v


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    mask = torch.randn(B, 1, S, S, generator=g)
    keep = torch.rand(B, H, S, S, generator=g) > 0.3
    keep[..., 0] = True  # no fully masked row
    return q, k, v, mask, keep


def test_forms_become_one_sdpa() -> None:
    q, k, v, mask, keep = _inputs()
    keep_dead_row = keep.clone()
    keep_dead_row[0, 1, 3] = False  # a huge finite fill gives uniform weights there, as written
    cases = [
        (matmul_scale_after, (q, k, v), "attention:matmul"),
        (matmul_scale_before_float_softmax, (q, k, v, mask), "attention:matmul"),
        (einsum_additive, (q, k, v, mask), "attention:einsum"),
        (einsum_3d_masked_fill, (q, k, v, keep_dead_row), "attention:einsum"),
        (baddbmm_form, (q, k, v, keep), "attention:baddbmm"),
        (baddbmm_bias, (q, k, v, mask), "attention:baddbmm"),
        (pretransposed_k, (q, k, v), "attention:matmul"),
        (inplace_fill_compvis, (q, k, v, keep_dead_row), "attention:einsum"),
        (inplace_fill_inf, (q, k, v, keep), "attention:matmul"),
    ]
    for fn, args, form in cases:
        gm, ex = capture(fn, *args)
        expected = gm(*ex)
        assert canonical_attention(gm) == {form: 1}, fn.__name__
        assert _sdpa_count(gm) == 1, (fn.__name__, gm.graph)
        names = {op_name(n) for n in gm.graph.nodes}
        assert not names & {"softmax", "einsum", "bmm", "baddbmm", "matmul"}, (fn.__name__, names)
        torch.testing.assert_close(gm(*ex), expected, atol=1e-5, rtol=1e-5, msg=fn.__name__)


def test_forms_left_alone() -> None:
    q, k, v, mask, keep = _inputs()
    cases = [
        (scores_used_elsewhere, (q, k, v)),
        (softmax_other_dim, (q, k, v)),
        (causal_from_scores, (q, k, v)),
        (probabilities_returned, (q, k, v)),
        (inplace_fill, (q, k, v, keep)),
        (inplace_fill_after_read, (q, k, v, keep)),
        (inplace_fill_before_scale, (q, k, v, keep)),
        (moderate_fill, (q, k, v, keep)),
        (scale_after_mask, (q, k, v, mask)),
    ]
    for fn, args in cases:
        gm, _ = capture(fn, *args)
        before = [n.format_node() for n in gm.graph.nodes]
        assert canonical_attention(gm) == {}, fn.__name__
        assert [n.format_node() for n in gm.graph.nodes] == before, fn.__name__


# ---------------------------------------------------------------- two models on 2 ranks
class DiTLikeBlock(torch.nn.Module):
    """facebookresearch-DiT-style attention with the fused path off."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = heads, 0.3  # not SDPA's default, so a lost scale would show
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(h)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # a second one, scaled before the product
        return x + (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


class LDMLikeAttention(torch.nn.Module):
    """CompVis-LDM-style self then cross attention: einsum with heads in the batch, additive mask."""

    def __init__(self, dim: int = 32, ctx_dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_k2, self.to_v2 = (torch.nn.Linear(ctx_dim, dim, bias=False) for _ in range(2))
        self.to_q2 = torch.nn.Linear(dim, dim, bias=False)
        self.out = torch.nn.Linear(dim, dim)

    def _attend(self, q, k, v, bias):
        b, n, c = q.shape
        h = self.heads
        q, k, v = (t.reshape(b, -1, h, c // h).permute(0, 2, 1, 3).reshape(b * h, -1, c // h) for t in (q, k, v))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        if bias is not None:
            sim = sim + bias
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        return out.reshape(b, h, n, c // h).permute(0, 2, 1, 3).reshape(b, n, c)

    def forward(self, x: torch.Tensor, x_bias: torch.Tensor, ctx: torch.Tensor, ctx_bias: torch.Tensor) -> torch.Tensor:
        self_bias = x_bias.repeat_interleave(self.heads, dim=0)[:, None, :]  # [B*H, 1, S]: key padding
        x = x + self._attend(self.to_q(x), self.to_k(x), self.to_v(x), self_bias)
        bias = ctx_bias.repeat_interleave(self.heads, dim=0)[:, None, :]  # [B*H, 1, S_ctx]
        x = x + self._attend(self.to_q2(x), self.to_k2(ctx), self.to_v2(ctx), bias)
        return self.out(x)


def _spmd_job() -> list[dict[str, Any]]:
    import xdit_compile

    torch.manual_seed(0)
    models = [
        ("dit", DiTLikeBlock().eval(), (torch.randn(2, 16, 32),)),
        ("ldm", LDMLikeAttention().eval(), (torch.randn(2, 16, 32), torch.randn(2, 16), torch.randn(2, 6, 16),
                                           torch.randn(2, 6))),
    ]
    results = []
    for name, model, args in models:
        with torch.no_grad():
            ref = model(*args)
        for opts, how in [({"ulysses_degree": 2, "inner": "eager"}, "-> ulysses"),
                          ({"ring_degree": 2, "inner": "eager"}, "-> ring")]:
            torch._dynamo.reset()
            xdit_compile.clear_reports()
            with torch.no_grad():
                out = torch.compile(model, backend="xdit", options=opts)(*args)
            text = "\n".join(str(r) for r in xdit_compile.reports())
            err = (out - ref).abs().max().item() / ref.abs().max().item()
            results.append({"model": name, "plan": how, "err": err, "report": text})
    return results


def test_spelled_out_attention_is_lowered_on_two_ranks() -> None:
    for rank_results in run_spmd(_spmd_job, 2):
        for r in rank_results:
            assert r["err"] < 1e-5, r
            assert r["plan"] in r["report"], r["report"]
            assert "-> replicated" not in r["report"] and "WHOLE GRAPH" not in r["report"], r["report"]
            form = "attention:matmul x2" if r["model"] == "dit" else "attention:einsum x2"
            assert form in r["report"], r["report"]
