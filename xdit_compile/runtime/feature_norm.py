"""Norms over a feature dim split across ranks (tensor parallel: q/k norms across all heads).

``rms_norm`` of the whole last dim, computed on this rank's features: the sum of squares is
all-reduced (``[..., 1]`` floats per row, tiny next to gathering the features).
"""

from __future__ import annotations

import torch

from . import collectives
from .collectives import Group
from .redistribute import xdit_op


@xdit_op("xdit_rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, full: int, group: Group) -> torch.Tensor:
    """``torch.rms_norm(x_full, (full,), weight_full, eps)``'s columns of this rank, from its columns ``x``
    (and the matching columns of ``weight``); statistics in float32, result in ``x``'s dtype."""
    xf = x.float()
    ss = collectives.all_reduce(xf.pow(2).sum(-1, keepdim=True), group)
    e = torch.finfo(x.dtype).eps if eps is None else eps
    y = xf * torch.rsqrt(ss / full + e)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)
