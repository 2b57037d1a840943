"""``Axis``: one logical mesh axis as the passes see it (size, this rank's index, groups)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    """A logical axis: ``batch`` (dp x cfg) or ``sp`` (ring x ulysses).

    ``rank`` is this process's index along the axis. For ``sp``, the index is
    ``ring_rank * ulysses + ulysses_rank`` and the sub-groups are given for USP.
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
    def ring_rank(self) -> int:
        return self.rank // self.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses

    def attention_strategy(self, heads: int, kv_heads: int) -> tuple[str, str]:
        """(strategy, why) for attention over a sequence sharded on this axis."""
        if self.name != "sp":
            return "ring", f"tokens sharded on the {self.name} axis: ring over it"
        divisible = heads % self.ulysses == 0 and kv_heads % self.ulysses == 0
        if self.ulysses > 1 and not divisible:
            return "ring", (f"{heads} heads ({kv_heads} kv) do not divide ulysses={self.ulysses}: "
                            f"ring attention over all {self.n} sequence ranks instead")
        if self.ring == 1:
            return "ulysses", f"ulysses={self.ulysses}"
        if self.ulysses == 1:
            return "ring", f"ring={self.ring}"
        return "usp", f"ulysses={self.ulysses} x ring={self.ring}"
