"""``ParallelPlan``: the degrees of every parallel method, validated, and the groups they use.

Mesh axis order, outermost first (rank = row-major index over these axes)::

    dp -> cfg -> pp -> ring -> ulysses

Ulysses is innermost because its all-to-alls are the most bandwidth-hungry: its ranks are
neighbours (the same node under ``torchrun``). Two derived axes group several mesh axes:
``batch`` = dp x cfg (the batch split) and ``sp`` = ring x ulysses (the token split), where
a rank's sp index is ``ring_index * ulysses_degree + ulysses_index``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch.distributed as dist

from .errors import PlanError

MESH_AXES = ("dp", "cfg", "pp", "ring", "ulysses")
DERIVED_AXES = {"batch": ("dp", "cfg"), "sp": ("ring", "ulysses")}
INNER_COMPILERS = ("inductor", "eager")

# xDiT's flag names, so that its users can reuse their launch scripts.
_OPTION_TO_FIELD = {
    "data_parallel_degree": "dp",
    "ulysses_degree": "ulysses",
    "ring_degree": "ring",
    "pipefusion_parallel_degree": "pp",
    "num_pipeline_patch": "num_pipeline_patch",
    "warmup_steps": "warmup_steps",
    "inner": "inner",
}


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of each parallel method; ``None`` means "decide from the graph" (auto plan).

    Args:
        dp: data-parallel degree (splits the batch).
        cfg: CFG-parallel degree, 1 or 2 (splits the batch into its cond/uncond halves).
        pp: PipeFusion degree (pipeline stages).
        ring: Ring-attention degree (splits the tokens; K/V travel around a ring).
        ulysses: Ulysses degree (splits the tokens; all-to-all swaps tokens for heads).
        num_pipeline_patch: PipeFusion patches; ``None`` means ``pp``.
        warmup_steps: PipeFusion steps run synchronously before stale K/V is used.
        inner: compiler for the rewritten per-rank graph, ``"inductor"`` or ``"eager"``.
    """

    dp: int | None = None
    cfg: int | None = None
    pp: int | None = None
    ring: int | None = None
    ulysses: int | None = None
    num_pipeline_patch: int | None = None
    warmup_steps: int = 1
    inner: str = "inductor"

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            d = getattr(self, axis)
            if d is not None and (not isinstance(d, int) or d < 1):
                raise PlanError(f"{axis} degree must be a positive int, got {d!r}")
        if self.cfg not in (None, 1, 2):
            raise PlanError(f"cfg degree must be 1 or 2 (cond/uncond halves), got {self.cfg}")
        if self.inner not in INNER_COMPILERS:
            raise PlanError(f"inner must be one of {INNER_COMPILERS}, got {self.inner!r}")
        if self.warmup_steps < 0:
            raise PlanError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "ParallelPlan":
        """Build a plan from ``torch.compile(..., options=...)`` (xDiT flag names)."""
        options = dict(options or {})
        plan = options.pop("plan", None)
        if plan is not None and not isinstance(plan, ParallelPlan):
            raise PlanError(f"options['plan'] must be a ParallelPlan, got {type(plan).__name__}")
        kwargs: dict[str, Any] = {}
        if "use_cfg_parallel" in options:
            kwargs["cfg"] = 2 if options.pop("use_cfg_parallel") else 1
        for key in list(options):
            if key in _OPTION_TO_FIELD:
                kwargs[_OPTION_TO_FIELD[key]] = options.pop(key)
        if options:
            known = sorted([*_OPTION_TO_FIELD, "use_cfg_parallel", "plan"])
            raise PlanError(f"unknown xdit option(s) {sorted(options)}; known options: {known}")
        if plan is not None:
            if kwargs:
                merged = {f.name: getattr(plan, f.name) for f in fields(plan)}
                merged.update(kwargs)
                return cls(**merged)
            return plan
        return cls(**kwargs)

    # ---------------------------------------------------------------- resolution
    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, a) is not None for a in MESH_AXES)

    def degree(self, axis: str) -> int:
        """Degree of a mesh or derived axis (1 when unset)."""
        names = DERIVED_AXES.get(axis, (axis,))
        return math.prod(getattr(self, a) or 1 for a in names)

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, a) or 1 for a in MESH_AXES)

    def resolve(self, world_size: int, batch: int | None = None, heads: int | None = None) -> "ParallelPlan":
        """Fill unset degrees so that they multiply to ``world_size``.

        With no degree set: split the batch where it divides (cfg first), then Ulysses while
        the heads divide, then Ring. With some degrees set, the rest default to 1 and the
        product must equal the world size.
        """
        given = {a: getattr(self, a) for a in MESH_AXES if getattr(self, a) is not None}
        if given:
            resolved = {a: given.get(a, 1) for a in MESH_AXES}
        else:
            resolved = dict.fromkeys(MESH_AXES, 1)
            left = world_size
            for axis in ("cfg", "dp"):
                while batch and left % 2 == 0 and (batch // resolved["dp"] // resolved["cfg"]) % 2 == 0:
                    if axis == "cfg" and resolved["cfg"] == 2:
                        break
                    resolved[axis] *= 2
                    left //= 2
                    if axis == "cfg":
                        break
            for p in _prime_factors(left):
                if heads and heads % (resolved["ulysses"] * p) == 0:
                    resolved["ulysses"] *= p
                else:
                    resolved["ring"] *= p
        plan = ParallelPlan(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **resolved})
        plan.validate(world_size)
        return plan

    def validate(self, world_size: int) -> None:
        """Raise ``PlanError`` unless the degrees multiply to ``world_size``."""
        if self.world_size != world_size:
            listing = " x ".join(f"{a}={self.degree(a)}" for a in MESH_AXES)
            raise PlanError(
                f"parallel degrees {listing} = {self.world_size} do not multiply to the world size "
                f"{world_size}; change the degrees (e.g. data_parallel_degree={world_size // math.gcd(world_size, self.world_size)}"
                f" if it divides) or launch {self.world_size} processes"
            )

    # ---------------------------------------------------------------- ranks and groups
    def coords(self, rank: int) -> dict[str, int]:
        """Index of ``rank`` along each mesh axis."""
        shape = [self.degree(a) for a in MESH_AXES]
        out: dict[str, int] = {}
        for axis, size in zip(reversed(MESH_AXES), reversed(shape)):
            out[axis] = rank % size
            rank //= size
        return {a: out[a] for a in MESH_AXES}

    def axis_rank(self, axis: str, rank: int) -> int:
        """Index of ``rank`` within a mesh or derived axis."""
        c = self.coords(rank)
        idx = 0
        for a in DERIVED_AXES.get(axis, (axis,)):
            idx = idx * self.degree(a) + c[a]
        return idx

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks that vary along ``axis`` (others fixed), in axis-index order."""
        members = DERIVED_AXES.get(axis, (axis,))
        shape = [self.degree(a) for a in MESH_AXES]
        others = [range(s) if a not in members else range(1) for a, s in zip(MESH_AXES, shape)]
        groups = []
        for fixed in itertools.product(*others):
            ranks = []
            for varying in itertools.product(*[range(self.degree(a)) for a in members]):
                coord = list(fixed)
                for a, v in zip(members, varying):
                    coord[MESH_AXES.index(a)] = v
                r = 0
                for c, s in zip(coord, shape):
                    r = r * s + c
                ranks.append(r)
            groups.append(ranks)
        return groups

    def describe(self) -> str:
        return " x ".join(f"{a}={self.degree(a)}" for a in MESH_AXES if self.degree(a) > 1) or "single rank"


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


_GROUPS: dict[tuple, dict[str, Any]] = {}


def process_groups(plan: ParallelPlan) -> dict[str, Any]:
    """The ``ProcessGroup`` of this rank for every axis of degree > 1 (created once per plan).

    Every rank creates every group in the same order, as ``torch.distributed`` requires.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError(
            "xdit needs a torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group() (gloo on CPU, nccl on GPU) before compiling"
        )
    key = tuple(plan.degree(a) for a in MESH_AXES) + (dist.get_world_size(),)
    if key not in _GROUPS:
        rank = dist.get_rank()
        mine: dict[str, Any] = {}
        for axis in ("batch", "sp", *MESH_AXES):
            if plan.degree(axis) <= 1:
                continue
            if plan.degree(axis) == dist.get_world_size():
                mine[axis] = dist.group.WORLD
                continue
            for ranks in plan.axis_groups(axis):
                g = dist.new_group(ranks)
                if rank in ranks:
                    mine[axis] = g
        _GROUPS[key] = mine
    return _GROUPS[key]
