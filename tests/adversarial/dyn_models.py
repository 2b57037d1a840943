"""Small DiT-like models whose sizes depend on data (for tests/test_data_dependent.py).

Compiled with ``torch._dynamo.config.capture_dynamic_output_shape_ops`` and
``capture_scalar_outputs`` on, Dynamo keeps their data-dependent ops in one graph with unbacked
sizes (without them, each is a graph break):

    select_text   per sample, ``torch.nonzero`` of the text mask picks the valid text tokens,
                  which join that sample's image tokens in one attention (image first); the
                  text part is dropped after it and the sample's result written back
    item_len      ``mask.sum(1).max().item()`` is the longest valid text: text truncated to it
                  (a slice length), joint [text, image] attention with a key-padding mask cut to
                  the same length

``make(name, batch=2, seed=0)`` returns ``(model.eval(), kwargs)``; ``inputs(name, batch, valid)``
builds inputs whose last sample has ``valid`` text tokens (the others ``TEXT``, or ``valid + 2``
for ``item_len``). Every forward takes ``return_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, TEXT = 64, 4, 8


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.o = nn.Linear(DIM, DIM)

    def heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, s, _ = x.shape
        return proj(x).view(b, s, HEADS, DIM // HEADS).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_img, self.n_txt = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = _Attention()
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))


class SelectText(nn.Module):
    """Per-sample attention over [image, valid text], valid text chosen with nonzero."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(4, DIM, 2, 2)
        self.txt = nn.Linear(32, DIM)
        self.blocks = nn.ModuleList(_Block() for _ in range(blocks))
        self.out = nn.Linear(DIM, 16)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        img = self.patch(x).flatten(2).transpose(1, 2)
        txt = self.txt(ctx)
        n_img = img.shape[1]
        for blk in self.blocks:
            a = blk.attn
            hi, ht = blk.n_img(img), blk.n_txt(txt)
            qi, ki, vi = a.heads(hi, a.q), a.heads(hi, a.k), a.heads(hi, a.v)
            qt, kt, vt = a.heads(ht, a.q), a.heads(ht, a.k), a.heads(ht, a.v)
            outs = []
            for i in range(img.shape[0]):
                keep = torch.nonzero(ctx_mask[i], as_tuple=False).flatten()
                q = torch.cat([qi[i:i + 1], qt[i:i + 1, :, keep]], dim=2)
                k = torch.cat([ki[i:i + 1], kt[i:i + 1, :, keep]], dim=2)
                v = torch.cat([vi[i:i + 1], vt[i:i + 1, :, keep]], dim=2)
                o = F.scaled_dot_product_attention(q, k, v)
                outs.append(o[:, :, :n_img])
            o = torch.cat(outs).transpose(1, 2).flatten(2)
            img = img + a.o(o)
            img = img + blk.mlp(img)
        return (self.out(img),)


class ItemLen(nn.Module):
    """Joint [text, image] attention over the text truncated to the longest valid caption (``.item()``)."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(4, DIM, 2, 2)
        self.txt = nn.Linear(32, DIM)
        self.blocks = nn.ModuleList(_Block() for _ in range(blocks))
        self.out = nn.Linear(DIM, 16)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        n = ctx_mask.sum(1).max().item()  # data-dependent slice length
        # What a model written for torch.compile states, so that both slices below have length n.
        torch._check(n >= 0)
        torch._check(n <= ctx.shape[1])
        img = self.patch(x).flatten(2).transpose(1, 2)
        txt = self.txt(ctx[:, :n])
        b, n_img = img.shape[0], img.shape[1]
        keep = torch.cat([ctx_mask[:, :n].bool(), torch.ones(b, n_img, dtype=torch.bool)], dim=1)
        mask = keep[:, None, None, :]
        h = torch.cat([txt, img], dim=1)
        for blk in self.blocks:
            a = blk.attn
            y = blk.n_img(h)
            o = F.scaled_dot_product_attention(a.heads(y, a.q), a.heads(y, a.k), a.heads(y, a.v), attn_mask=mask)
            h = h + a.o(o.transpose(1, 2).flatten(2))
            h = h + blk.mlp(h)
        return (self.out(h[:, n:]),)


_MODELS = {"select_text": SelectText, "item_len": ItemLen}


def inputs(name: str, batch: int = 2, valid: int = 5, seed: int = 0) -> dict:
    """Inputs (the same on every rank) whose last sample has ``valid`` of ``TEXT`` text tokens (see module docstring)."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    mask = torch.ones(batch, TEXT, dtype=torch.long)
    if name == "item_len":
        mask[:, min(valid + 2, TEXT - 1):] = 0  # every caption is padded: the slice length is below TEXT
    mask[-1, valid:] = 0
    return {"x": x, "ctx": torch.randn(batch, TEXT, 32, generator=g), "ctx_mask": mask}


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[nn.Module, dict]:
    """Model ``name`` (eval mode) with weights from ``seed`` and its inputs."""
    torch.manual_seed(seed)
    return _MODELS[name]().eval(), inputs(name, batch, seed=seed)
