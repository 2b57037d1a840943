"""Convolutions over a spatially sharded input: exact, with halos from the neighbouring ranks.

Output row ``o`` of a convolution (kernel k, stride s, padding p, dilation d) reads input rows
``o*s - p .. o*s - p + d*(k-1)``, so a rank's rows need ``before = p`` rows of the previous
rank and ``after = d*(k-1) - p - s + 1`` of the next one (zeros at the global edges). The
local op ``conv_halo`` (``passes/local_ops/conv.py``) exchanges those halos
(``runtime.halo.halo_exchange``) and runs the convolution with no padding on the sharded dim:

    conv2d(x: S(2)[B, C, H, W], k=3, s=1, p=1)  -> S(2)[B, D, H, W]      halo 1 + 1 rows
    conv2d(x: S(2), k=1)                        -> S(2)                  no halo
    conv2d(x: S(2)[.., H, ..], k=s=2, p=0)      -> S(2)[.., H/2, ..]     patch embedding, no halo
    conv2d(x: S(2:15x2)[.., 30, ..], k=s=2)     -> S(2)[.., 15, ..]      whole patch rows, 8 + 7
    conv2d(x: S(2), k=3, s=2, p=1)              -> S(2)[.., H/2, ..]     halo 1 + 0 rows
    conv*(x: S(0))                              -> S(0)                  batch
    conv*(x: S(1)) or transposed                -> needs R               channels / not handled

Stride 1 keeps any single-segment shard (uneven too) when the output has the input's length;
stride > 1 needs every rank's rows to start and end on a stride: even shards whose rows are a
multiple of the stride, or shards in units of whole strides, uneven too (``S(2:15x2)``: 30
latent rows as 15 patch rows, 8 + 7 on 2 ranks, give ``S(2)`` of the 15 patch rows). Every
rank must hold at least as many rows as the halo is deep.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import shape, value
from ..placements import REPLICATE, Replicate, Shard, is_even, local_sizes
from .core import Comm, Decision, OpView, local_op, on_first_shard, regroup, replicate_all


def _tuple(v: object, k: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * k
    return tuple(int(x) for x in v)  # type: ignore[union-attr]


def _padding(raw: object, k: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """(before, after) padding per spatial dim, or None when it cannot be written per dim."""
    spatial = len(k)
    if raw == "valid":
        return [(0, 0)] * spatial
    if raw == "same":
        out = []
        for ki, di in zip(k, dilation):
            total = di * (ki - 1)
            out.append((total // 2, total - total // 2))
        return out
    if isinstance(raw, str):
        return None
    return [(p, p) for p in _tuple(raw, spatial)]


@on_first_shard
def conv(op: OpView, x: fx.Node, p: Shard, params: dict) -> Decision | None:
    w = op.arg(1, "weight")
    if p.dim == 0:
        return Decision(p, params)
    k = tuple(shape(w)[2:])
    spatial = len(k)
    if len(shape(x)) != spatial + 2 or p.dim < 2:
        return replicate_all(op, "convolution over sharded channels")
    if op.name in ("convolution", "_convolution") and op.arg(6, "transposed", False):
        return replicate_all(op, "transposed convolution over a sharded spatial dim")
    stride = _tuple(op.arg(3, "stride", 1), spatial)
    dilation = _tuple(op.arg(5, "dilation", 1), spatial)
    pads = _padding(op.arg(4, "padding", 0), k, dilation)
    if pads is None or any(a != b for i, (a, b) in enumerate(pads) if i != p.dim - 2):
        return replicate_all(op, "convolution padding is not expressible per dim")
    i = p.dim - 2
    s, span = stride[i], dilation[i] * (k[i] - 1)
    pad_before, pad_after = pads[i]
    in_len = shape(x)[p.dim]
    out_len = shape(op.node)[p.dim]
    if len(p.segments) != 1:
        return replicate_all(op, "convolution over a shard of several segments")
    before = pad_before
    if s == 1:
        if out_len != in_len:
            return replicate_all(op, "stride-1 convolution changes the length of the sharded dim")
        after = span - pad_before
        out = p
        sizes = local_sizes(p, op.n)
    else:
        q = regroup(p, 1, op.n)
        if q is not None and is_even(q, op.n) and (q.length // op.n) % s == 0 and out_len * s == in_len:
            out = Shard(p.dim, (out_len,), 1)
            sizes = local_sizes(q, op.n)
        elif p.inner % s == 0 and out_len * s == in_len:
            # Units of whole strides (patch rows): every rank's rows start and end on a stride,
            # even when the units do not split evenly (15 patch rows on 2 ranks: 8 + 7).
            out = Shard(p.dim, p.segments, p.inner // s)
            sizes = local_sizes(p, op.n)
        else:
            return replicate_all(op, f"shard {p} cuts rows inside a stride of {s} (a shard in whole strides, "
                                     f"units of {s} rows, would keep the convolution sharded)")
        after = max(0, span - pad_before - s + 1)
        if any((rows + before + after - span - 1) // s + 1 != rows // s for rows in sizes if rows):
            return replicate_all(op, "convolution window does not tile the shards")
    if after < 0 or min(sizes) < max(before, after, 1):
        return replicate_all(op, "a rank holds fewer rows than the convolution halo")
    if before == 0 and after == 0 and pad_before == 0:
        return Decision(out, params)
    v = value(x)
    halo_bytes = v.numel() // max(v.shape[p.dim], 1) * (before + after) * v.element_size()
    padding = tuple(0 if j == i else pads[j][0] for j in range(len(pads)))  # none on the sharded dim
    halo = local_op("conv_halo", dim=p.dim, before=before, after=after, padding=padding)
    return Decision(out, params, local=halo, comm=Comm(1 if before or after else 0, float(halo_bytes)))


def halo_rule(op: OpView) -> Decision | None:
    """``xdit_halo`` met again on another axis: fine unless that axis shards the halo dim."""
    p = op.pl(op.node.args[0])
    if isinstance(p, Replicate):
        return Decision(REPLICATE)
    if isinstance(p, Shard) and p.dim != op.node.args[1]:
        return Decision(p)
    return None


TABLE = [
    (["conv1d", "conv2d", "conv3d", "_convolution", "convolution"], conv),
    (["xdit_halo"], halo_rule),
]
