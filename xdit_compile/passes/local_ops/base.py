"""What a local-op surgery sees (``LocalContext``) and is (``Surgery``).

A rule names the op a rank runs in place of the global one with a ``LocalOp`` (data, in
``rules/core.py``); ``passes.lower`` looks its kind up in ``local_ops.SURGERIES`` and calls the
surgery on the node, after the node's inputs have been redistributed as the rule asked.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch.fx as fx

from ...rules.core import LocalOp


@runtime_checkable
class LocalContext(Protocol):
    """This rank on the axis being lowered, as a surgery may read it (``passes.lower`` implements it)."""

    @property
    def rank(self) -> int:
        """This process's index along the axis."""
        ...

    @property
    def size(self) -> int:
        """The number of ranks on the axis."""
        ...

    @property
    def group(self) -> str:
        """The name of the axis's process group (what runtime collectives take)."""
        ...

    def placement(self, node: fx.Node) -> Any:
        """The placement ``node`` has in the graph being lowered (a seeded input's slice included)."""
        ...

    def record_collective(self, kind: str, node: fx.Node, nbytes: int) -> None:
        """Report a collective the surgery inserted (halo exchange, statistics all-reduce): its kind,
        the node it serves and the bytes this rank receives per call, for the plan report."""
        ...


# surgery(graph, node, op, ctx) edits ``node`` in place (new target / args) and returns None, or
# inserts a node computing the same value and returns it: the lowering then moves every user of
# ``node`` (and the bookkeeping of its placement) to the returned node and erases ``node``.
Surgery = Callable[[fx.Graph, fx.Node, LocalOp, LocalContext], "fx.Node | None"]
