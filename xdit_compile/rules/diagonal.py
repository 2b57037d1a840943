"""Diagonal matrices built from a tensor's last dim: pointwise over the leading dims.

    diag_embed(g: S(1)[B, S, C])               -> S(1)[B, S, C, C]
    diag_embed(g: S(0)[S, C], dim1=0, dim2=2)  -> S(1)[C, S, C]      leading dims keep their order
    diag_embed(g: S(2)[B, S, C])               -> no rule (the diagonal itself): gathered
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import shape
from ..placements import Shard
from .core import Decision, OpView, on_first_shard


@on_first_shard
def diag_embed(op: OpView, x: fx.Node, p: Shard, others: dict) -> Decision | None:
    ndim = len(shape(x))
    if p.dim == ndim - 1:
        return None
    out_ndim = ndim + 1
    offset, dim1, dim2 = op.arg(1, "offset", 0), op.arg(2, "dim1", -2), op.arg(3, "dim2", -1)
    if not all(isinstance(v, int) for v in (offset, dim1, dim2)):
        return None
    diag = {dim1 % out_ndim, dim2 % out_ndim}
    rest = [k for k in range(out_ndim) if k not in diag]
    return Decision(p.with_dim(rest[p.dim]), others)


TABLE = [
    (["diag_embed"], diag_embed),
]
