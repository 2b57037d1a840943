"""Normalisations and softmax: fine while the sharded dim is not one they normalise over.

    layer_norm(x: S(1)[B, S, D], (D,))  -> S(1)
    rms_norm(q: S(2)[B, H, S, Dh], (Dh,)) -> S(2)
    softmax(x: S(1), dim=1)             -> needs R (gather)
"""

from __future__ import annotations

import torch.fx as fx

from ..placements import Shard
from .core import Decision, OpView, on_first_shard, replicate_all



@on_first_shard
def trailing_norm(op: OpView, x: fx.Node, p: Shard, params: dict) -> Decision | None:
    normalized = op.arg(1, "normalized_shape")
    k = 1 if isinstance(normalized, int) else len(normalized)
    if p.dim >= op.out_ndim - k:
        return replicate_all(op, f"{op.name} normalises over the sharded dim {p.dim}")
    return Decision(p, params)


@on_first_shard
def along_dim(op: OpView, x: fx.Node, p: Shard, others: dict) -> Decision | None:
    dim = op.arg(2, "dim", 1) if op.name == "normalize" else op.arg(1, "dim")
    if not isinstance(dim, int):
        return None
    if dim % op.out_ndim == p.dim:
        return replicate_all(op, f"{op.name} over the sharded dim {p.dim}")
    return Decision(p)


TABLE = [
    (["layer_norm", "rms_norm"], trailing_norm),
    (["softmax", "log_softmax", "normalize", "cumsum", "cumprod", "logcumsumexp"], along_dim),
]
