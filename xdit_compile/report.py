"""The plan report: what was sharded, how attention was lowered, what runs replicated and why.

``XDIT_LOG=plan`` logs every report as it is made (logger ``xdit_compile``);
``xdit_compile.reports()`` returns them; ``str(report)`` is the text.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

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

    def __str__(self) -> str:
        lines = [f"xdit plan for {self.graph} (rank {self.rank}/{self.world_size}, {self.nodes} nodes): {self.plan}"]
        if self.recognised:
            lines.append("  recognised: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.recognised.items())))
        if self.fallback:
            lines.append(f"  WHOLE GRAPH REPLICATED: {self.fallback}")
        lines.extend(f"  WARNING: {w}" for w in self.warnings)
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
        if self.pass_seconds:
            lines.append("  pass time: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.pass_seconds.items()))
        return "\n".join(lines)


_REPORTS: list[PlanReport] = []


def publish(report: PlanReport) -> None:
    _REPORTS.append(report)
    if "plan" in os.environ.get("XDIT_LOG", "").split(","):
        if not log.handlers and not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        log.setLevel(logging.INFO)
        log.info("%s", report)


def reports() -> list[PlanReport]:
    """Every plan report made in this process, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()
