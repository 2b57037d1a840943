"""Normalisations and softmax: fine while the sharded dim is not one they normalise over.

    layer_norm(x: S(1)[B, S, D], (D,))  -> S(1)
    rms_norm(q: S(2)[B, H, S, Dh], (Dh,)) -> S(2)
    rms_norm(q: S(2)[B, S, H*Dh], (H*Dh,)) -> S(2)   sum of squares all-reduced (tensor parallel)
    softmax(x: S(1), dim=1)             -> needs R (gather)
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import shape
from ..placements import Shard
from .core import Comm, Decision, OpView, local_op, on_first_shard, replicate_all



@on_first_shard
def trailing_norm(op: OpView, x: fx.Node, p: Shard, params: dict) -> Decision | None:
    normalized = op.arg(1, "normalized_shape")
    k = 1 if isinstance(normalized, int) else len(normalized)
    if p.dim >= op.out_ndim - k:
        if op.name == "rms_norm" and k == 1 and op.node.op == "call_function":
            return _rms_norm_split_features(op, x, p)
        return replicate_all(op, f"{op.name} normalises over the sharded dim {p.dim}")
    return Decision(p, params)


def _rms_norm_split_features(op: OpView, x: fx.Node, p: Shard) -> Decision:
    """rms_norm(x: S(last)[..., D], (D,), w) -> S(last): each rank normalises its features with the
    sum of squares all-reduced (runtime/feature_norm.py); ``w`` is split like the features."""
    w = op.arg(2, "weight")
    needs = {w: p.with_dim(0)} if isinstance(w, fx.Node) and op.pl(w) != p.with_dim(0) else {}
    rows = shape(x)[:-1]
    nrows = 1
    for d in rows:
        nrows *= int(d)

    return Decision(p, needs, local=local_op("rms_norm_split_features", length=p.length, rows=nrows),
                    comm=Comm(1, float(nrows * 4)))


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
