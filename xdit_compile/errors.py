"""The exceptions xdit_compile raises. Every message names what failed and how to fix it."""

from __future__ import annotations


class XditError(RuntimeError):
    """Base class of every error raised by xdit_compile."""


class PlanError(XditError, ValueError):
    """The parallel plan is inconsistent with itself, the world size or the model's shapes."""


class ShardingError(XditError):
    """A pass could not place or rewrite a node; the message names the node, op and placements."""


class PassError(XditError):
    """A compiler pass failed; the message names the pass and the passes that ran before it."""


class CollectiveError(XditError):
    """A collective was called with arguments that cannot work (shapes, sizes, group)."""


class GradientError(XditError):
    """Backward through a rewritten (multi-rank) graph, which has no gradient rules yet."""
