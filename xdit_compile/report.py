"""The plan report: what was sharded, how attention was lowered, what runs replicated and why.

``XDIT_LOG=plan`` logs every report as it is made (logger ``xdit_compile``);
``xdit_compile.reports()`` returns them; ``str(report)`` is the text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .context import current

log = logging.getLogger("xdit_compile")


@dataclass
class AxisReport:
    axis: str
    degree: int
    seeds: list[tuple[str, str]] = field(default_factory=list)  # (input, placement)
    forced: list[tuple[str, str]] = field(default_factory=list)  # (annotated value, placement)
    attention: list[tuple[str, str, str]] = field(default_factory=list)  # (node, kind, lowering)
    replicated: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op, why)
    collectives: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, node, bytes/call)
    note: str | None = None


@dataclass
class PlanReport:
    """One compiled graph's plan."""

    graph: str
    plan: str
    rank: int
    world_size: int
    nodes: int
    axes: list[AxisReport] = field(default_factory=list)
    fallback: str | None = None  # why the whole graph runs replicated, if it does
    warnings: list[str] = field(default_factory=list)  # what may differ from one rank (e.g. train-mode dropout)
    recognised: dict[str, int] = field(default_factory=dict)  # role -> count
    pass_seconds: dict[str, float] = field(default_factory=dict)
    graph_breaks: dict[str, int] = field(default_factory=dict)  # Dynamo's graph breaks so far: reason -> count
    calls: Any = None  # branches.CallsReport when the cfg groups take the branches from separate calls (live)
    step_cache: Any = None  # cache.StepCacheReport (cut, options, generations) or a note why not cached
    memory: Any = None  # memory.MemoryEstimate: per-rank parameters + activations against memory_budget

    def __str__(self) -> str:
        lines = [f"xdit plan for {self.graph} (rank {self.rank}/{self.world_size}, {self.nodes} nodes): {self.plan}"]
        if self.recognised:
            lines.append("  recognised: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.recognised.items())))
        if self.fallback:
            lines.append(f"  WHOLE GRAPH REPLICATED: {self.fallback}")
        lines.extend(f"  WARNING: {w}" for w in self.warnings)
        if self.memory is not None:
            lines.append(f"  memory: {self.memory}")
        if self.graph_breaks:
            lines.append(f"  GRAPH BREAKS: {graph_break_text(self.graph_breaks)}")
        for ax in self.axes:
            lines.append(f"  axis {ax.axis} (degree {ax.degree})")
            lines.append("    sharded inputs: " + (", ".join(f"{i} {p}" for i, p in ax.seeds) or "none"))
            if ax.forced:
                lines.append("    annotated: " + ", ".join(f"{i} {p}" for i, p in ax.forced))
            if ax.note:
                lines.append(f"    NOTE: {ax.note}")
            for node, kind, how in ax.attention:
                lines.append(f"    attention {node}: {kind} -> {how}")
            for node, op, why in ax.replicated:
                lines.append(f"    replicated {node} ({op}): {why}")
            total = sum(b for _, _, b in ax.collectives)
            lines.append(f"    collectives: {len(ax.collectives)} inserted, {total} bytes per call in all")
            for kind, node, b in ax.collectives:
                lines.append(f"      {kind} at {node}: {b} bytes")
        if self.calls is not None:
            lines.append(str(self.calls))
        if self.step_cache is not None:
            lines.extend("  " + line for line in str(self.step_cache).splitlines())
        if self.pass_seconds:
            lines.append("  pass time: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.pass_seconds.items()))
        return "\n".join(lines)


CAPTURE_FIX = ("to capture data-dependent ops (nonzero, item, tolist) in the graph, set "
               "torch._dynamo.config.capture_dynamic_output_shape_ops = True and "
               "torch._dynamo.config.capture_scalar_outputs = True")
_CAPTURABLE = ("capture_dynamic_output_shape_ops", "capture_scalar_outputs", "Dynamic shape operator",
               "data-dependent", "item()", "tolist")


def graph_breaks() -> dict[str, int]:
    """Dynamo's graph breaks in this process so far (``torch._dynamo.utils.counters["graph_break"]``),
    each reason shortened to its first line and the op it names: ``"Dynamic shape operator
    (aten.nonzero.default)" -> 3``. A reason whose fix is one of the capture flags is marked ``[capture]``."""
    from torch._dynamo.utils import counters

    out: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        text = str(reason)
        short = text.strip().splitlines()[0].strip() if text.strip() else "unknown"
        debug = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if "Developer debug context:" in ln]
        if debug and debug[0] and debug[0] not in short:
            short += f" ({debug[0][:80]})"
        if any(k in text for k in _CAPTURABLE):
            short += " [capture]"
        out[short] = out.get(short, 0) + int(count)
    return out


def graph_break_text(breaks: dict[str, int]) -> str:
    """One line: how many graph breaks, why, what that costs under xdit, and the fix when there is one."""
    total = sum(breaks.values())
    why = ", ".join(f"{r.replace(' [capture]', '')} x{c}" for r, c in sorted(breaks.items(), key=lambda kv: -kv[1]))
    text = (f"{total} so far ({why}): the code between graphs runs eagerly, outside xdit, REPLICATED on every "
            "rank (each rank does all of its work)")
    if any(r.endswith("[capture]") for r in breaks):
        text += f"; {CAPTURE_FIX}"
    else:
        text += "; torch._dynamo.explain(model)(*args) shows where they are"
    return text


def publish(report: PlanReport) -> None:
    ctx = current()
    ctx.reports.append(report)
    if ctx.settings.logs("plan"):
        if not log.handlers and not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        log.setLevel(logging.INFO)
        log.info("%s", report)


def reports() -> list[PlanReport]:
    """Every plan report made in this process, oldest first."""
    return list(current().reports)


def clear_reports() -> None:
    current().reports.clear()
