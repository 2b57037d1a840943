"""Hand-written joint DiTs with empty tensors, two attending streams, odd prefixes and ``diag_embed``.

Written for issue 10, not copied from any codebase; each model isolates one construct:

    model          what it exercises
    empty_cat      full-head RoPE whose pass-through slice ``x[..., d:]`` is empty, zero padding
                   ``x.new_zeros(B, 0, C)`` and an empty history, all cat'ed to sharded tokens
    empty_split    ``split`` / ``tensor_split`` / ``chunk`` with empty pieces, on tokens and channels
    two_streams    text and image streams each self-attend before a joint attention (a
                   dual-stream block where text attends first); a long second stream
    av_streams     video + audio: each stream self-attends, then both attend jointly
    prefix         joint sequence [text 7, image 64] sharded as one input, the text prefix sliced
                   off at 7 (not a shard boundary), then per-part modulation and a joint attention
    cut_joint      a joint sequence built in the graph, cut inside the text by ``x[:, 3:]`` and ``narrow``
                   (no seed lines up: the cut tensor is gathered once and re-split evenly)
    diag_embed     per-token gates built with ``torch.diag_embed`` and applied by ``matmul``

Hidden 64 = 4 heads x 16, batch 2. ``make(name, batch, seed)`` returns ``(model.eval(), kwargs)``;
``model(**kwargs, return_dict=False)`` returns a tuple whose first item is the image output.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS = 64, 4
HEAD = DIM // HEADS


def _heads(x: torch.Tensor) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, HEADS, HEAD).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


class _Attn(nn.Module):
    """Plain self-attention with a fused QKV projection (SDPA)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v)))


class _Out(nn.Module):
    def forward(self, out: torch.Tensor, return_dict: bool) -> Any:
        return (out,) if not return_dict else {"sample": out}


def _rope(x: torch.Tensor, rot: int) -> torch.Tensor:
    """Rotate-half RoPE on the first ``rot`` channels; the rest passes through (empty when rot = head)."""
    s = x.shape[-2]
    pos = torch.arange(s, dtype=x.dtype)[:, None]
    freqs = pos * torch.arange(1, rot // 2 + 1, dtype=x.dtype) / s
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    a, b = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat([-b, a], -1) * sin
    return torch.cat([rotated, x_pass], dim=-1)


class EmptyCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.kv_ctx = nn.Linear(32, 2 * DIM)
        self.q_ctx = nn.Linear(DIM, DIM)
        self.proj = nn.Linear(DIM, 16)
        self.wrap = _Out()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                history: torch.Tensor, return_dict: bool = True) -> Any:
        x = self.embed(hidden_states)
        b, _, c = x.shape
        pad = x.new_zeros(b, 0, c)  # a control video as long as the latents: nothing to pad
        x = torch.cat([history, x, pad], dim=1)  # an empty history in front
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = _rope(q, HEAD), _rope(k, HEAD)  # the rotary part covers the whole head
        x = x + self.out(_merge(F.scaled_dot_product_attention(q, k, v)))
        kc, vc = (_heads(t) for t in self.kv_ctx(encoder_hidden_states).chunk(2, dim=-1))
        x = x + _merge(F.scaled_dot_product_attention(_heads(self.q_ctx(x)), kc, vc))
        return self.wrap(self.proj(F.layer_norm(x, (DIM,))), return_dict)


class EmptySplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, DIM)
        self.txt = nn.Linear(32, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.ada = nn.Linear(DIM, 6 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.ff = nn.Linear(DIM, DIM)
        self.proj = nn.Linear(DIM, 16)
        self.wrap = _Out()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True) -> Any:
        img, txt = self.embed(hidden_states), self.txt(encoder_hidden_states)
        t, i = txt.shape[1], img.shape[1]
        x = torch.cat([txt, img], dim=1)
        # Channel split with an empty piece (no extra projections configured).
        q, k, v, extra = self.qkv(x).split([DIM, DIM, DIM, 0], dim=-1)
        q = q + extra.sum(-1, keepdim=True)
        a = _merge(F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(v)))
        x = x + self.out(a)
        shift, scale, gate, *_ = self.ada(x.mean(1, keepdim=True)).chunk(6, dim=-1)
        x = x + gate * self.ff(F.layer_norm(x, (DIM,)) * (1 + scale) + shift)
        # Token split with empty pieces: no register tokens, no trailing tokens.
        regs, txt, img, tail = x.split([0, t, i, 0], dim=1)
        img = torch.cat([regs, img, tail], dim=1)
        before, img2, after = torch.tensor_split(img, [0, i], dim=1)
        img2 = img2 + before.sum(1, keepdim=True) + after.sum(1, keepdim=True)
        return self.wrap(self.proj(img2), return_dict)


class TwoStreams(nn.Module):
    """Text and image each self-attend (with their own weights), then one joint attention."""

    def __init__(self, text_dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(16, DIM)
        self.txt = nn.Linear(text_dim, DIM)
        self.txt_attn = _Attn()
        self.img_attn = _Attn()
        self.txt_qkv = nn.Linear(DIM, 3 * DIM)
        self.img_qkv = nn.Linear(DIM, 3 * DIM)
        self.txt_ff = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.img_ff = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.proj = nn.Linear(DIM, 16)
        self.wrap = _Out()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True) -> Any:
        img, txt = self.embed(hidden_states), self.txt(encoder_hidden_states)
        txt = txt + self.txt_attn(F.layer_norm(txt, (DIM,)))  # text attends first, on its own
        img = img + self.img_attn(F.layer_norm(img, (DIM,)))
        t = txt.shape[1]
        tq, tk, tv = (_heads(x) for x in self.txt_qkv(txt).chunk(3, dim=-1))
        iq, ik, iv = (_heads(x) for x in self.img_qkv(img).chunk(3, dim=-1))
        q, k, v = torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2)
        joint = _merge(F.scaled_dot_product_attention(q, k, v))
        txt, img = txt + joint[:, :t], img + joint[:, t:]
        txt = txt + self.txt_ff(F.layer_norm(txt, (DIM,)))
        img = img + self.img_ff(F.layer_norm(img, (DIM,)))
        return self.wrap(self.proj(img), return_dict)


class Prefix(nn.Module):
    """One joint input [text 7, image 64]; the text prefix is sliced off at 7 in every block."""

    def __init__(self, text_len: int = 7, layers: int = 2) -> None:
        super().__init__()
        self.text_len = text_len
        self.embed = nn.Linear(16, DIM)
        self.blocks = nn.ModuleList(_Attn() for _ in range(layers))
        self.txt_mod = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(layers))
        self.img_mod = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(layers))
        self.proj = nn.Linear(DIM, 16)
        self.wrap = _Out()

    def forward(self, hidden_states: torch.Tensor, return_dict: bool = True) -> Any:
        x = self.embed(hidden_states)
        t = self.text_len
        for attn, tm, im in zip(self.blocks, self.txt_mod, self.img_mod):
            x = x + attn(F.layer_norm(x, (DIM,)))
            txt, img = x[:, :t], x[:, t:]  # cuts inside rank 0's shard
            x = torch.cat([txt + tm(txt), img + F.gelu(im(img))], dim=1)
        return self.wrap(self.proj(x[:, t:]), return_dict)


class CutJoint(nn.Module):
    """A joint [text 8, image 64] sequence built in the graph, then cut inside the text (a dropped
    register token) and again off the text: cuts no seed can line up with."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, DIM)
        self.txt = nn.Linear(32, DIM)
        self.attn1 = _Attn()
        self.attn2 = _Attn()
        self.proj = nn.Linear(DIM, 16)
        self.wrap = _Out()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True) -> Any:
        img = self.embed(hidden_states)
        x = torch.cat([self.txt(encoder_hidden_states), img], dim=1)
        x = x + self.attn1(F.layer_norm(x, (DIM,)))
        x = x[:, 3:]  # drop three register tokens: the cut falls inside a shard of the text
        x = x + self.attn2(F.layer_norm(x, (DIM,)))
        return self.wrap(self.proj(x.narrow(1, x.shape[1] - img.shape[1], img.shape[1])), return_dict)


class DiagEmbed(nn.Module):
    """Per-token channel gates as diagonal matrices (``diag_embed``) applied by ``matmul``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, DIM)
        self.attn = _Attn()
        self.gate = nn.Linear(DIM, 8)
        self.mix = nn.Linear(DIM, 8)
        self.back = nn.Linear(8, DIM)
        self.proj = nn.Linear(DIM, 16)
        self.wrap = _Out()

    def forward(self, hidden_states: torch.Tensor, return_dict: bool = True) -> Any:
        x = self.embed(hidden_states)
        x = x + self.attn(F.layer_norm(x, (DIM,)))
        g = torch.diag_embed(torch.sigmoid(self.gate(x)))  # [B, S, 8, 8]
        m = (self.mix(x).unsqueeze(-2) @ g).squeeze(-2)  # [B, S, 8]
        return self.wrap(self.proj(x + self.back(m)), return_dict)


def _img(batch: int, g: torch.Generator, tokens: int = 64) -> torch.Tensor:
    return torch.randn(batch, tokens, 16, generator=g)


def _txt(batch: int, g: torch.Generator, tokens: int = 8, dim: int = 32) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=g)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], dict[str, Any]]]] = {
    "empty_cat": (EmptyCat, lambda b, g: {"hidden_states": _img(b, g), "encoder_hidden_states": _txt(b, g),
                                          "history": torch.zeros(b, 0, DIM)}),
    "empty_split": (EmptySplit, lambda b, g: {"hidden_states": _img(b, g), "encoder_hidden_states": _txt(b, g)}),
    "two_streams": (TwoStreams, lambda b, g: {"hidden_states": _img(b, g),
                                              "encoder_hidden_states": _txt(b, g, tokens=32)}),
    "av_streams": (lambda: TwoStreams(text_dim=24), lambda b, g: {"hidden_states": _img(b, g),
                                                                   "encoder_hidden_states": _txt(b, g, 48, 24)}),
    "prefix": (Prefix, lambda b, g: {"hidden_states": _img(b, g, tokens=71)}),
    "cut_joint": (CutJoint, lambda b, g: {"hidden_states": _img(b, g), "encoder_hidden_states": _txt(b, g)}),
    "diag_embed": (DiagEmbed, lambda b, g: {"hidden_states": _img(b, g)}),
}


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Model ``name`` with weights from ``seed`` and its example keyword inputs, in eval mode."""
    build, inputs = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    return model, inputs(batch, torch.Generator().manual_seed(seed + 1))
