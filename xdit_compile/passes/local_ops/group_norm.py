"""``group_norm_stats``: GroupNorm over a spatial shard with exact global statistics.

    group_norm(x, G, w, b, eps)  ->  halo.group_norm(x, G, w, b, eps, count, group)

``count`` (elements per (sample, group) of the global tensor) comes from the rule
(``rules/group_norm.py``); the runtime op all-reduces float32 partial sums over the axis.
"""

from __future__ import annotations

import torch.fx as fx

from ...graph import value
from ...rules.core import LocalOp
from ...runtime import halo
from .base import LocalContext

# F.group_norm(input, num_groups, weight=None, bias=None, eps=1e-05)
_ARGS = ("input", "num_groups", "weight", "bias", "eps")
_DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5}


def group_norm_stats(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> None:
    a = dict(zip(_ARGS, node.args))
    a.update(node.kwargs)
    for key, default in _DEFAULTS.items():
        a.setdefault(key, default)
    v = value(a["input"])
    ctx.record_collective("all_reduce (group_norm statistics)", node, v.shape[0] * a["num_groups"] * 2 * 4)
    node.target = halo.group_norm
    node.args = (a["input"], a["num_groups"], a["weight"], a["bias"], a["eps"], op["count"], ctx.group)
    node.kwargs = {}


TABLE = [
    ("group_norm_stats", group_norm_stats),
]
