"""``rms_norm_split_features``: rms_norm over a last dim split across the ranks (tensor parallel).

    rms_norm(x: S(last)[..., D], (D,), w, eps)  ->  feature_norm.rms_norm(x, w, eps, D, group)

``length`` (the global D) and ``rows`` (for the report) come from the rule (``rules/norm.py``); the runtime op all-reduces the
sum of squares of each row over the axis, so every rank divides by the whole row's norm.
"""

from __future__ import annotations

import torch.fx as fx

from ...graph import arg
from ...rules.core import LocalOp
from ...runtime import feature_norm
from .base import LocalContext


def rms_norm_split_features(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    eps = arg(node, 3, "eps", None)
    weight = arg(node, 2, "weight", None)
    ctx.record_collective("all_reduce (rms_norm statistics)", node, op["rows"] * 4)
    node.target = feature_norm.rms_norm
    node.args = (node.args[0], weight, eps, op["length"], ctx.group)
    node.kwargs = {}


TABLE = [
    ("rms_norm_split_features", rms_norm_split_features),
]
