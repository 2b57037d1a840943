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


class PassOrderError(PassError):
    """A pass list whose order does not give a pass what it requires (a bug in that list, never a
    fallback); the message names the pass, the missing requirement and the fix."""


class CollectiveError(XditError):
    """A collective was called with arguments that cannot work (shapes, sizes, group)."""


class GradientError(XditError):
    """Backward through a rewritten (multi-rank) graph holding ops without gradient rules
    (PipeFusion, halo exchanges, GroupNorm statistics); the message names them and the fix."""


class RankMismatchError(XditError):
    """Ranks disagree about what they compile or run (plan, options, graph, input shapes,
    parameters or per-call inputs); raised on every rank, naming the ranks and what differs."""


class CollectiveTimeoutError(XditError):
    """A collective or pipeline transfer waited longer than its group's timeout; the message
    names this rank, the peer group, the collective and the graph node it belongs to."""


def unwrap(error: BaseException) -> BaseException:
    """The xdit error inside Dynamo's ``BackendCompilerFailed`` (else ``error`` itself).

    Dynamo (torch 2.13) re-raises an exception from a backend as
    ``torch._dynamo.exc.BackendCompilerFailed`` with the original in ``inner_exception``
    (``__cause__`` is None), so ``except xdit_compile.PlanError`` around a compiled call does
    not catch it; ``unwrap_errors()`` does that translation.
    """
    inner = getattr(error, "inner_exception", None)
    return inner if isinstance(inner, XditError) else error


class unwrap_errors:  # noqa: N801 - used like contextlib's lower-case context managers
    """``with xdit_compile.unwrap_errors(): out = model(x)`` raises the ``XditError`` a backend
    raised during compilation itself (``PlanError``, ``RankMismatchError``...), chained to
    Dynamo's ``BackendCompilerFailed``, so that ``except xdit_compile.PlanError`` works."""

    def __enter__(self) -> "unwrap_errors":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> bool:
        if error is not None:
            inner = unwrap(error)
            if inner is not error:
                raise inner from error
        return False
