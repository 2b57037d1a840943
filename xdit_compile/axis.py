"""``Axis``: one logical mesh axis as the passes see it (size, this rank's index, groups)."""

from __future__ import annotations

from dataclasses import dataclass

from .axes import AxisSpec, axis_spec


@dataclass(frozen=True)
class Axis:
    """A logical axis of ``axes.AXES`` as lowered on this rank: ``batch`` (dp x cfg) or ``sp`` (ring x ulysses).

    ``rank`` is this process's index along the axis. For ``sp``, the index is
    ``ring_rank * ulysses + ulysses_rank`` and the sub-groups are given for USP. Which
    attention strategy an axis gets is the registry's choice (``strategies/registry.py``).
    """

    name: str
    n: int
    rank: int
    group: str
    ulysses: int = 1
    ring: int = 1
    ulysses_group: str | None = None
    ring_group: str | None = None

    @property
    def spec(self) -> AxisSpec:
        return axis_spec(self.name)

    @property
    def ring_rank(self) -> int:
        return self.rank // self.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses
