"""One pass manager for every path (batch and sp axes in ``backend.py``, the stages of PipeFusion).

A ``Pass`` names what it ``requires`` and ``provides`` (facts, e.g. ``"plan:sp"`` for the sp axis's
propagation); ``run_passes`` runs a list of them in order and

- checks the order first: a requirement no earlier pass provides raises ``PassOrderError`` naming
  the pass and the fact (a bug in the pass list, never a fallback);
- skips passes disabled by name (``XDIT_DISABLE_PASSES=plan:sp,...``, or a family: ``plan``), and
  with them every pass that needs what a skipped pass would have provided, logging one WARNING
  per disabled pass that lists those dependents;
- times each pass (``seconds``), records whether it changed the graph (its return value);
- wraps an unexpected exception in ``PassError`` naming the failing pass and the passes before it
  (``XditError`` subclasses pass through: they already name the node and the fix).

The passes share one context object (the caller's: ``backend.State``, PipeFusion's
``StageContext``); what one pass hands to a later one is a typed field of it, not a closure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch.fx as fx

from ..errors import PassError, PassOrderError, XditError

log = logging.getLogger("xdit_compile")

# (graph, context) -> whether the pass changed the graph (None: it does not say).
PassFn = Callable[[fx.GraphModule, Any], "bool | None"]


@dataclass(frozen=True)
class Pass:
    """One named pass: ``fn(gm, ctx)``, what it reads from earlier passes and what it gives later ones."""

    name: str
    fn: PassFn
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """``plan`` for ``plan:sp``: disabling a family disables each of its passes."""
        return self.name.split(":")[0]


@dataclass
class PassRun:
    """What ``run_passes`` did: passes run (in order), skipped (name -> why), time, changes."""

    ran: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    changed: dict[str, bool] = field(default_factory=dict)

    def provided(self, passes: Sequence[Pass]) -> set[str]:
        """The facts the passes that ran provide."""
        return {f for p in passes if p.name in self.ran for f in p.provides}


def check_order(passes: Sequence[Pass]) -> None:
    """Raise ``PassOrderError`` when a pass requires a fact no earlier pass provides."""
    provided: dict[str, str] = {}
    for i, p in enumerate(passes):
        for need in p.requires:
            if need not in provided:
                later = [q.name for q in passes[i + 1:] if need in q.provides]
                fix = (f"move {later[0]} before it" if later else f"add a pass that provides {need!r} before it")
                raise PassOrderError(
                    f"xdit pass {p.name!r} requires {need!r}, which no earlier pass provides (passes before it: "
                    f"{[q.name for q in passes[:i]] or 'none'}): {fix}")
        for fact in p.provides:
            provided.setdefault(fact, p.name)
    names = [p.name for p in passes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PassOrderError(f"xdit pass list names {twice} more than once: give each pass its own name")


def plan_skips(passes: Sequence[Pass], disabled: Iterable[str]) -> dict[str, str]:
    """{pass name: why it is skipped} for ``disabled`` (names or families) and their dependents."""
    off = set(disabled)
    skipped: dict[str, str] = {}
    missing: dict[str, str] = {}  # fact -> the skipped pass that would have provided it
    for p in passes:
        if p.name in off or p.family in off:
            skipped[p.name] = "disabled by XDIT_DISABLE_PASSES"
        else:
            lost = [need for need in p.requires if need in missing]
            if not lost:
                continue
            skipped[p.name] = f"it needs pass {missing[lost[0]]}, which XDIT_DISABLE_PASSES disables"
            root = missing[lost[0]]
            for fact in p.provides:
                missing.setdefault(fact, root)
            continue
        for fact in p.provides:
            missing.setdefault(fact, p.name)
    return skipped


def run_passes(gm: fx.GraphModule, ctx: Any, passes: Sequence[Pass], *, disabled: Iterable[str] = (),
               seconds: dict[str, float] | None = None, also_known: Iterable[Pass] | None = ()) -> PassRun:
    """Run ``passes`` on ``gm`` in order (see the module docstring); ``seconds`` gets each pass's time
    as it finishes (so a caller's report keeps the times of the passes before a failure).

    ``also_known``: the passes other lists of the same compile run (so a disabled name among them is
    not reported as unknown); None: another list reports unknown names, this one stays quiet.
    """
    check_order(passes)
    disabled = {d for d in disabled if d}
    known = {n for p in [*passes, *(also_known or ())] for n in (p.name, p.family)}
    unknown = disabled - known if also_known is not None else set()
    if unknown:
        log.warning("xdit: XDIT_DISABLE_PASSES names no pass %s; passes: %s",
                    sorted(unknown), ", ".join(p.name for p in passes))
    run = PassRun()
    skips = plan_skips(passes, disabled)
    for p in passes:
        if p.name in skips:
            run.skipped[p.name] = skips[p.name]
            if skips[p.name].startswith("disabled"):
                dependents = [q for q, why in skips.items() if why.startswith(f"it needs pass {p.name},")]
                log.warning("xdit: pass %s disabled by XDIT_DISABLE_PASSES%s", p.name,
                            f"; skipped too, since they need it: {', '.join(dependents)}" if dependents else "")
            else:
                log.warning("xdit: pass %s skipped too: %s", p.name, skips[p.name])
            continue
        start = time.perf_counter()
        try:
            changed = p.fn(gm, ctx)
        except XditError:
            raise
        except Exception as e:
            raise PassError(f"xdit pass {p.name!r} failed after passes {run.ran or 'none'}: "
                            f"{type(e).__name__}: {e}") from e
        run.seconds[p.name] = time.perf_counter() - start
        if seconds is not None:
            seconds[p.name] = run.seconds[p.name]
        run.changed[p.name] = bool(changed)
        run.ran.append(p.name)
        log.debug("xdit: pass %s took %.1f ms%s", p.name, run.seconds[p.name] * 1e3, " (changed)" if changed else "")
    return run
