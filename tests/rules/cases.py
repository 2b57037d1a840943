"""Small functions exercising each op family's rules under a forced token shard.

Each case: ``fn(*inputs)`` marks its token input with ``xdit_compile.shard`` and runs ops of
one family. ``expect`` is ``None`` when nothing may run replicated, or a substring of the
reason the plan report must give for the replicated fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from xdit_compile import replicate, shard

B, S, H, D = 2, 8, 4, 16


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[..., torch.Tensor]
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    expect: str | None = None  # fallback reason expected in the report (None: none allowed)
    whole_graph: bool = False  # expect the whole graph to run replicated


def _x(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def pointwise_broadcast(x: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    return torch.nn.functional.silu(x + pos) * (1 + scale[:, None]) - x.float() / 3


def reshape_merge_split(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    y = x.view(B * S, D) * 2  # [B*S] carries one segment per sample
    y = y.reshape(B, S, H, D // H).flatten(2)
    return y.transpose(1, 2).contiguous().transpose(1, 2) + 1


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)  # 16 tokens = a 4 x 4 grid; each rank holds whole rows
    y = x.reshape(B, 4, 4, 2, 2, 4)
    y = torch.einsum("nhwpqc->nchpwq", y)
    return y.reshape(B, 4, 8, 8)


def linear_and_norms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    y = F.linear(x, w)
    y = F.layer_norm(y, (D,))
    y = torch.rms_norm(y, (D,), None, 1e-6)
    var = y.pow(2).mean(-1, keepdim=True)  # diffusers' decomposed RMSNorm
    return y * torch.rsqrt(var + 1e-6)


def sum_over_tokens(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x, v = shard(x, 1), shard(v, 1)
    kv = torch.einsum("bsd,bse->bde", x, v)  # linear attention's k^T v: a partial sum
    m = x.mean(dim=1, keepdim=True)  # partial, rewritten as local sum / global count
    return torch.einsum("bsd,bde->bse", x, kv) + m + x.sum(dim=1, keepdim=True)


def softmax_over_tokens(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    return torch.softmax(x, dim=1) + torch.softmax(x, dim=-1)


def joint_cat_split(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    img = shard(img, 1)
    joint = torch.cat([txt, img], dim=1)  # txt is sliced for free: S(1: T + I)
    joint = joint * 2 + 1
    t, i = joint.split([txt.shape[1], img.shape[1]], dim=1)
    head = joint[:, : txt.shape[1]]
    return i.sum(-1, keepdim=True) + t.mean() + head.mean(1, keepdim=True).sum()


def patch_embed_conv(latent: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    latent = shard(latent, 2)
    h = F.conv2d(latent, w, stride=2)
    return h.flatten(2).transpose(1, 2)


def halo_conv(latent: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    latent = shard(latent, 2)
    return F.conv2d(latent, w, padding=1)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def self_attention(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    q, k, v = (_heads(x * c, H) for c in (1.0, 0.5, -1.0))
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).flatten(2)


def self_attention_positional_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    q, k, v = (_heads(x * c, H) for c in (1.0, 0.5, -1.0))
    o = torch._C._nn.scaled_dot_product_attention(q, k, v, mask)
    return o.transpose(1, 2).flatten(2)


def cross_attention(x: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    o = F.scaled_dot_product_attention(_heads(x, H), _heads(txt, H), _heads(txt * 2, H))
    return o.transpose(1, 2).flatten(2)


def uneven_tokens(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)  # 9 tokens: 5 + 4 on 2 ranks
    q = _heads(x, H)
    return F.scaled_dot_product_attention(q, q * 2, q - 1).transpose(1, 2).flatten(2)


def three_heads(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)  # 3 heads do not divide ulysses=2: ring instead
    q = _heads(x, 3)
    return F.scaled_dot_product_attention(q, q * 2, q - 1).transpose(1, 2).flatten(2)


def rope_like(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    q = x.view(B, S, H, D // H)
    real, imag = q.reshape(B, S, H, -1, 2).unbind(-1)
    rot = torch.stack([-imag, real], dim=-1).flatten(3)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    return (q * cos + rot * sin).flatten(2)


def sizes_read_off_shards(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    return x.new_zeros(x.size(0), x.size(1), 1) + x.mean(-1, keepdim=True) * x.shape[1]


def op_without_rule(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1)
    return torch.sort(x, dim=1).values + torch.cummax(x, dim=1).values


def inplace_on_shard(x: torch.Tensor) -> torch.Tensor:
    x = shard(x, 1) * 1
    x.mul_(2)
    x[:, :3] = 0  # a write at absolute token offsets: the graph must not be sharded
    return x


def keep_replicated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = replicate(F.linear(x, w))
    return y.cumsum(dim=1)


CASES = [
    Case("pointwise_broadcast", pointwise_broadcast, lambda g: (_x(g, B, S, D), _x(g, 1, S, D), _x(g, B, D))),
    Case("reshape_merge_split", reshape_merge_split, lambda g: (_x(g, B, S, D),)),
    Case("unpatchify", unpatchify, lambda g: (_x(g, B, 16, 16),)),
    Case("linear_and_norms", linear_and_norms, lambda g: (_x(g, B, S, D), _x(g, D, D))),
    Case("sum_over_tokens", sum_over_tokens, lambda g: (_x(g, B, S, D), _x(g, B, S, D))),
    Case("softmax_over_tokens", softmax_over_tokens, lambda g: (_x(g, B, S, D),), expect="softmax over the sharded dim"),
    Case("joint_cat_split", joint_cat_split, lambda g: (_x(g, B, S, D), _x(g, B, 6, D))),
    Case("patch_embed_conv", patch_embed_conv, lambda g: (_x(g, B, 4, 16, 16), _x(g, D, 4, 2, 2))),
    Case("halo_conv", halo_conv, lambda g: (_x(g, B, 4, 16, 16), _x(g, 8, 4, 3, 3))),
    Case("self_attention", self_attention, lambda g: (_x(g, B, S, D),)),
    Case("self_attention_positional_mask", self_attention_positional_mask,
         lambda g: (_x(g, B, S, D), torch.rand(B, 1, S, S, generator=g) > 0.3)),
    Case("cross_attention", cross_attention, lambda g: (_x(g, B, S, D), _x(g, B, 5, D))),
    Case("uneven_tokens", uneven_tokens, lambda g: (_x(g, B, 9, D),)),
    Case("three_heads", three_heads, lambda g: (_x(g, B, S, 24),)),
    Case("rope_like", rope_like, lambda g: (_x(g, B, S, D), _x(g, S, D // H))),
    Case("sizes_read_off_shards", sizes_read_off_shards, lambda g: (_x(g, B, S, D),)),
    Case("op_without_rule", op_without_rule, lambda g: (_x(g, B, S, D),), expect="no sharding rule for op 'sort'"),
    Case("inplace_on_shard", inplace_on_shard, lambda g: (_x(g, B, S, D),), whole_graph=True),
    Case("keep_replicated", keep_replicated, lambda g: (_x(g, B, S, D), _x(g, D, D))),
]


def run_cases(options: dict) -> list[tuple[str, float, float, str, str | None]]:
    """On every rank: each case compiled with "xdit" against eager -> (name, err, scale, report, fallback)."""
    import torch._dynamo

    import xdit_compile

    out = []
    for case in CASES:
        torch._dynamo.reset()
        xdit_compile.clear_reports()
        inputs = case.inputs(torch.Generator().manual_seed(0))
        ref = case.fn(*inputs)
        got = torch.compile(case.fn, backend="xdit", options={**options, "inner": "eager"}, fullgraph=True)(*inputs)
        reports = xdit_compile.reports()
        fallback = "; ".join(r.fallback for r in reports if r.fallback) or None
        out.append((case.name, float((got - ref).abs().max()), float(ref.abs().max()),
                    "\n".join(str(r) for r in reports), fallback))
    return out
