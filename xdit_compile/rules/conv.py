"""Convolutions: patch embeddings (kernel == stride, no padding) keep a spatial shard.

    conv2d(x: S(2)[B, C, H, W], kernel=stride=p)  -> S(2)[B, D, H/p, W/p]
        when every rank's rows are a multiple of p; otherwise, or with halos, needs R.
    conv*(x: S(0))                                 -> S(0)   (batch)
"""

from __future__ import annotations

from ..graph import shape
from ..placements import REPLICATE, Replicate, Shard, is_even
from .core import Decision, OpView, replicate_all


def _tuple(v: object, k: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * k
    return tuple(v)  # type: ignore[arg-type]


def conv(op: OpView) -> Decision | None:
    x, w = op.node.args[0], op.arg(1, "weight")
    p = op.pl(x)
    params = {t: REPLICATE for t in op.tensor_inputs()[1:] if not isinstance(op.pl(t), Replicate)}
    if isinstance(p, Replicate):
        return Decision(REPLICATE, params)
    if not isinstance(p, Shard):
        return None
    if p.dim == 0:
        return Decision(p, params)
    spatial = len(shape(x)) - 2
    if p.dim < 2:
        return replicate_all(op, "convolution over sharded channels")
    k = shape(w)[2:]
    stride = _tuple(op.arg(3, "stride", 1), spatial)
    padding = op.arg(4, "padding", 0)
    dilation = _tuple(op.arg(5, "dilation", 1), spatial)
    i = p.dim - 2
    if isinstance(padding, str):
        padding = (0,) * spatial if padding == "valid" else None
    padding = _tuple(padding, spatial) if padding is not None else None
    if padding is None or k[i] != stride[i] or padding[i] != 0 or dilation[i] != 1:
        return replicate_all(op, "convolution window crosses shard boundaries (halo exchange not implemented)")
    if len(p.segments) != 1 or not is_even(p, op.n) or (p.length // op.n) % stride[i]:
        return replicate_all(op, "shard rows are not a multiple of the convolution stride")
    out_len = p.length // stride[i]
    if out_len % op.n:
        return replicate_all(op, "output rows do not divide the axis size")
    return Decision(Shard(p.dim, (out_len,), 1), params)


TABLE = [
    (["conv1d", "conv2d", "conv3d", "_convolution", "convolution"], conv),
]
