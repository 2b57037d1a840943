"""Ops that make tensors: from sizes they are replicated; ``*_like`` follows its input.

    arange(S) -> R            zeros_like(x: S(1)) -> S(1)           x.new_zeros(n) -> R
"""

from __future__ import annotations

from ..placements import REPLICATE, Replicate, Shard
from .core import Decision, OpView

FROM_SIZES = ["arange", "zeros", "ones", "full", "empty", "randn", "rand", "randint", "tensor", "linspace",
              "logspace", "eye", "scalar_tensor", "as_tensor", "new_zeros", "new_ones", "new_empty",
              "new_full", "new_tensor"]
LIKE = ["zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"]


def from_sizes(op: OpView) -> Decision:
    """A new replicated tensor. ``x.new_*`` reads only dtype and device from ``x``; a tensor
    given as data (``torch.tensor(t)``, ``as_tensor(t)``, ``x.new_tensor(t)``) is copied,
    so it must be whole: gathered (or all-reduced) first."""
    receiver = op.node.args[0] if op.name.startswith("new_") and op.node.args else None
    needs = {x: REPLICATE for x in op.tensor_inputs() if x is not receiver and not isinstance(op.pl(x), Replicate)}
    return Decision(REPLICATE, needs)


def like(op: OpView) -> Decision | None:
    p = op.pl(op.node.args[0])
    return Decision(p) if isinstance(p, (Replicate, Shard)) else Decision(REPLICATE, {op.node.args[0]: REPLICATE})


TABLE = [
    (FROM_SIZES, from_sizes),
    (LIKE, like),
]
