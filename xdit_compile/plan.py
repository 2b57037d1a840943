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
from datetime import timedelta
from typing import Any, Mapping

import torch.distributed as dist

from .cache.options import check_cache_options
from .context import current
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
    "timeout": "timeout",
    "check_inputs": "check_inputs",
    # step caching (``cache/``; validated by ``cache/options.py``)
    "use_fbcache": "use_fbcache",
    "use_teacache": "use_teacache",
    "cache_threshold": "cache_threshold",
    "cache_first_steps": "cache_first_steps",
    "cache_last_steps": "cache_last_steps",
    "cache_num_steps": "cache_num_steps",
    "teacache_coefficients": "teacache_coefficients",
}
# The xDiT flag name of each degree, for messages that tell the user what to pass.
_FIELD_TO_OPTION = {field: option for option, field in _OPTION_TO_FIELD.items()}


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
        timeout: seconds a collective or pipeline transfer of the groups the backend creates
            (and the ranks' agreement check at compile time) may wait for a peer before it
            raises; ``None`` keeps the default group's timeout (``init_process_group(timeout=)``).
        check_inputs: per call, check with one tiny collective that every rank got the same
            inputs (``runtime/agreement.py``); ``False`` skips it.
        use_fbcache / use_teacache / cache_threshold / cache_first_steps / cache_last_steps /
            cache_num_steps / teacache_coefficients: step caching (``cache/``, docs/step_cache.md).
    """

    dp: int | None = None
    cfg: int | None = None
    pp: int | None = None
    ring: int | None = None
    ulysses: int | None = None
    num_pipeline_patch: int | None = None
    warmup_steps: int = 1
    inner: str = "inductor"
    timeout: float | None = None
    check_inputs: bool = True
    use_fbcache: bool = False
    use_teacache: bool = False
    cache_threshold: float = 0.0
    cache_first_steps: int = 1
    cache_last_steps: int = 0
    cache_num_steps: int | None = None
    teacache_coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # bool is an int subclass: True would pass as degree 1, so it is refused by name.
        for axis in MESH_AXES:
            _check_int(axis, getattr(self, axis), 1, "a positive int (1 = off)", optional=True)
        if self.cfg not in (None, 1, 2):
            raise PlanError(f"cfg degree must be 1 or 2 (the cond/uncond halves; option use_cfg_parallel=True or "
                            f"False), got {self.cfg!r}")
        _check_int("num_pipeline_patch", self.num_pipeline_patch, 1,
                   "a positive int, or None for one patch per pipeline stage", optional=True)
        _check_int("warmup_steps", self.warmup_steps, 0, "an int >= 0")
        if not isinstance(self.inner, str) or self.inner not in INNER_COMPILERS:
            raise PlanError(f"option inner={self.inner!r} is not accepted: use one of {list(INNER_COMPILERS)}")
        t = self.timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf):
            raise PlanError(f"option timeout={t!r} ({type(t).__name__}) is not accepted: use a positive number "
                            "of seconds (e.g. timeout=60.0), or None for the default group's timeout")
        if not isinstance(self.check_inputs, bool):
            raise PlanError(f"option check_inputs={self.check_inputs!r} ({type(self.check_inputs).__name__}) is not "
                            "accepted: use True or False")
        check_cache_options(self)

    @property
    def timeout_delta(self) -> timedelta | None:
        """``timeout`` as the ``timedelta`` torch.distributed takes (None: the default)."""
        return None if self.timeout is None else timedelta(seconds=float(self.timeout))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "ParallelPlan":
        """Build a plan from ``torch.compile(..., options=...)`` (xDiT flag names)."""
        if options is not None and not isinstance(options, Mapping):
            raise PlanError(f"xdit options must be a dict such as {{'ulysses_degree': 2}}, got "
                            f"{type(options).__name__} {_short(options)}")
        options = dict(options or {})
        bad_keys = [k for k in options if not isinstance(k, str)]
        if bad_keys:
            raise PlanError(f"xdit option names must be strings, got {bad_keys!r}")
        plan = options.pop("plan", None)
        if plan is not None and not isinstance(plan, ParallelPlan):
            raise PlanError(f"options['plan'] must be a ParallelPlan, got {type(plan).__name__}")
        kwargs: dict[str, Any] = {}
        if "use_cfg_parallel" in options:
            use = options.pop("use_cfg_parallel")
            # A string such as "false" is truthy: refuse anything but a real bool.
            if not isinstance(use, bool):
                raise PlanError(f"option use_cfg_parallel={use!r} ({type(use).__name__}) is not accepted: use "
                                "True (CFG parallel, degree 2) or False")
            kwargs["cfg"] = 2 if use else 1
        for key in list(options):
            if key in _OPTION_TO_FIELD:
                kwargs[_OPTION_TO_FIELD[key]] = options.pop(key)
        if isinstance(kwargs.get("teacache_coefficients"), list):  # a frozen plan keeps a tuple
            kwargs["teacache_coefficients"] = tuple(kwargs["teacache_coefficients"])
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
            fixes = self._fitting_degrees(world_size)
            hint = f"change the degrees (e.g. {' or '.join(fixes)}) or " if fixes else ""
            raise PlanError(
                f"parallel degrees {listing} = {self.world_size} do not multiply to the world size "
                f"{world_size}; {hint}launch {self.world_size} processes"
            )

    def _fitting_degrees(self, world_size: int) -> list[str]:
        """Option settings that change one degree so that the product is ``world_size`` (checked)."""
        out: list[str] = []
        for axis in ("dp", "ring", "ulysses", "pp", "cfg"):
            rest = self.world_size // self.degree(axis)
            if world_size % rest:
                continue
            new = world_size // rest
            if new == self.degree(axis) or (axis == "cfg" and new not in (1, 2)):
                continue
            out.append(_spell(axis, new))  # rest x new == world_size, as world_size % rest == 0
            if len(out) == 2:
                break
        return out

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


def check_plan(options: Mapping[str, Any] | None, world_size: int | None = None) -> ParallelPlan:
    """Validate ``torch.compile(..., options=...)`` before compiling; raises ``PlanError``.

    ``world_size`` defaults to the default process group's size when one is initialised. With
    some degree given, the rest are filled (1) and the product is checked against the world
    size; with none given, the degrees are chosen from the graph at compile time, so the plan
    is returned unresolved. A ``PlanError`` raised here is not wrapped by Dynamo.
    """
    plan = ParallelPlan.from_options(options)
    if world_size is None and dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    if world_size is None:
        return plan
    _check_int("world_size", world_size, 1, "a positive int")
    if any(getattr(plan, a) is not None for a in MESH_AXES) or world_size == 1:
        return plan.resolve(world_size)
    return plan


def _spell(field_name: str, value: Any = None) -> str:
    """The option users pass for a plan field (xDiT's flag name), with ``value`` when given."""
    if field_name == "cfg":
        return "use_cfg_parallel" if value is None else f"use_cfg_parallel={value == 2}"
    option = _FIELD_TO_OPTION.get(field_name, field_name)
    return option if value is None else f"{option}={value}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_int(name: str, value: Any, low: int, accepted: str, optional: bool = False) -> None:
    """Raise ``PlanError`` naming the option unless ``value`` is an int >= ``low`` (not a bool)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PlanError(f"option {_spell(name)}={_short(value)} ({type(value).__name__}) is not accepted: "
                        f"use {accepted}")


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def process_groups(plan: ParallelPlan) -> dict[str, Any]:
    """The ``ProcessGroup`` of this rank for every axis of degree > 1 (created once per plan).

    Every rank creates every group in the same order, as ``torch.distributed`` requires (the
    backend checks first that the ranks agree on the plan: ``runtime/agreement.py``). With
    ``plan.timeout`` set, every group gets that timeout, the whole world included (a new
    group of every rank, not the default one, whose timeout belongs to the user).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError(
            "xdit needs a torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group() (gloo on CPU, nccl on GPU) before compiling"
        )
    key = tuple(plan.degree(a) for a in MESH_AXES) + (dist.get_world_size(), plan.timeout)
    cache, _ = current().group_cache(dist.group.WORLD)
    if key not in cache:
        rank = dist.get_rank()
        mine: dict[str, Any] = {}
        for axis in ("batch", "sp", *MESH_AXES):
            if plan.degree(axis) <= 1:
                continue
            if plan.degree(axis) == dist.get_world_size():
                mine[axis] = world_group(plan)
                continue
            for ranks in plan.axis_groups(axis):
                g = dist.new_group(ranks, timeout=plan.timeout_delta)
                if rank in ranks:
                    mine[axis] = g
        cache[key] = mine
    return cache[key]


def world_group(plan: ParallelPlan) -> Any:
    """Every rank, with ``plan.timeout``: the default group when no timeout is set.

    Created on first use: every rank must reach the first call for a timeout in the same order
    (the backend calls it right after the agreement check).
    """
    if plan.timeout is None:
        return dist.group.WORLD
    _, worlds = current().group_cache(dist.group.WORLD)
    if plan.timeout not in worlds:
        worlds[plan.timeout] = dist.new_group(list(range(dist.get_world_size())), timeout=plan.timeout_delta)
    return worlds[plan.timeout]


def group_ranks(group: Any) -> list[int]:
    """Global ranks of a process group (or of a group's name), for error messages."""
    import torch.distributed.distributed_c10d as c10d

    if isinstance(group, str):
        group = c10d._resolve_process_group(group)
    return list(dist.get_process_group_ranks(group))
