"""Resampling: nearest upsampling by an integer factor keeps every shard boundary.

Nearest upsampling by ``s`` copies input row ``i`` to output rows ``i*s .. i*s + s - 1``, so
whatever rows a rank holds, it holds exactly the output rows they become: every shard unit
just grows ``s`` times (``inner * s``), uneven and multi-segment shards included.

    interpolate(x: S(2)[B, C, H, W], scale_factor=2, mode="nearest") -> S(2)[B, C, 2H, 2W]
        (written S(2:Hx2) when the split is uneven, S(2) otherwise)
    interpolate(x: S(2), size=(2H, 2W))      -> S(2)        local op: size of the local rows
    interpolate(x: S(0) or S(1), ...)        -> same        batch / channels untouched
    bilinear, bicubic, non-integer factors   -> needs R     (they would need halos)
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..graph import shape
from ..placements import Shard
from .core import Decision, OpView, local_op, on_first_shard, regroup, replicate_all

INTERPOLATE = ["interpolate", "upsample", "upsample_nearest"]
ATEN_NEAREST = ["upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d"]
_NEAREST_MODES = ("nearest", "nearest-exact")


def _size_index(op: OpView) -> tuple[int, str]:
    return (1, "output_size") if op.name in ATEN_NEAREST else (1, "size")


def _scale_factors(raw: Any, spatial: int) -> tuple[float, ...] | None:
    if raw is None:
        return None
    if isinstance(raw, (int, float)):
        return (float(raw),) * spatial
    return tuple(float(s) for s in raw)


@on_first_shard
def upsample(op: OpView, x: fx.Node, p: Shard, others: dict) -> Decision | None:
    if p.dim < 2:
        return Decision(p)
    mode = "nearest" if op.name in ATEN_NEAREST or op.name == "upsample_nearest" else op.arg(3, "mode", "nearest")
    if mode not in _NEAREST_MODES:
        return replicate_all(op, f"{mode} upsampling reads rows across shard boundaries (no halo rule)")
    in_len, out_len = shape(x)[p.dim], shape(op.node)[p.dim]
    if in_len == 0 or out_len % in_len:
        return replicate_all(op, "upsampling by a non-integer factor on the sharded dim")
    s = out_len // in_len
    spatial = len(shape(x)) - 2
    if op.name in INTERPOLATE:
        factors = _scale_factors(op.arg(2, "scale_factor"), spatial)
        if factors is not None and factors[p.dim - 2] != s:
            return replicate_all(op, "upsampling scale factor is not the integer ratio of the sizes")
    out = Shard(p.dim, p.segments, p.inner * s)
    out = regroup(out, 1, op.n) or out
    index, name = _size_index(op)
    explicit = op.arg(index, name) is not None
    return Decision(out, local=local_op("interpolate_local_size") if explicit else None)


TABLE = [
    (INTERPOLATE + ATEN_NEAREST, upsample),
]
