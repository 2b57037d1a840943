"""Complex views: RoPE written as complex products (``view_as_complex``, ``view_as_real``).

A complex view pairs (or splits) the trailing size-2 dim; every other dim keeps its shard:

    view_as_complex(x: S(1)[B, S, H, D/2, 2]) -> S(1)[B, S, H, D/2]   (complex)
    view_as_real(z: S(1)[B, S, H, D/2])       -> S(1)[B, S, H, D/2, 2]
    polar(abs: S(0), angle: S(0))             -> S(0)                  (elementwise)
    view_as_complex(x: S(last))               -> needs R (the pair would be split)
"""

from __future__ import annotations

from ..graph import shape
from ..placements import Replicate, Shard
from .core import Decision, OpView
from .pointwise import pointwise


def view_as_complex(op: OpView) -> Decision | None:
    src = op.node.args[0]
    p = op.pl(src)
    if isinstance(p, Replicate):
        return Decision(p)
    if not isinstance(p, Shard) or p.dim == len(shape(src)) - 1:
        return None
    return Decision(p)


def view_as_real(op: OpView) -> Decision | None:
    p = op.pl(op.node.args[0])
    return Decision(p) if isinstance(p, (Replicate, Shard)) else None


TABLE = [
    (["view_as_complex"], view_as_complex),
    (["view_as_real"], view_as_real),
    (["polar", "complex"], pointwise),
]
