"""``ParallelPlan``: the degrees of every parallel method, validated, and the device mesh they use.

The mesh dimensions and the logical axes over them come from the axis registry
(``axes.py``): ``dp -> cfg -> pp -> ring -> ulysses -> tp``, outermost first, with ``batch`` =
dp x cfg and ``sp`` = ring x ulysses. ``device_mesh`` builds torch's ``DeviceMesh`` with
those named dimensions (the ones of degree > 1) and flattens each logical axis of several
dimensions into one sub-mesh; ``process_groups`` hands the passes one group per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist

from . import axes
from .bytesize import parse_bytes
from .cache.options import check_cache_options
from .context import current
from .errors import PlanError

INNER_COMPILERS = ("inductor", "eager")

# xDiT's flag names, so that its users can reuse their launch scripts.
_SETTINGS = {name: name for name in ("num_pipeline_patch", "warmup_steps", "inner", "timeout", "check_inputs",
                                     "reorder_comms",
                                     # step caching (``cache/``; validated by ``cache/options.py``)
                                     "use_fbcache", "use_teacache", "cache_threshold", "cache_first_steps",
                                     "cache_last_steps", "cache_num_steps", "teacache_coefficients",
                                     "memory_budget", "tp_sequence_shard")}


def _option_to_field() -> dict[str, str]:
    """xDiT's flag name -> plan field. The degrees' options come from the axis registry (read at each
    call, so a dimension registered later counts); use_cfg_parallel (a bool for cfg 2) is parsed apart."""
    return {**{d.option: d.name for d in axes.MESH_DIMS}, **_SETTINGS}


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of each parallel method; ``None`` means "decide from the graph" (auto plan).

    Args:
        dp: data-parallel degree (splits the batch).
        cfg: CFG-parallel degree (``use_cfg_parallel=True``: 2; ``cfg_degree=k``: k guidance branches):
            splits the batch into its cond/uncond halves, or, where the pipeline calls the model
            once per branch (batch 1), runs those calls at once (``branches/``).
        pp: PipeFusion degree (pipeline stages).
        ring: Ring-attention degree (splits the tokens; K/V travel around a ring).
        ulysses: Ulysses degree (splits the tokens; all-to-all swaps tokens for heads).
        num_pipeline_patch: PipeFusion patches; ``None`` means ``pp``.
        warmup_steps: PipeFusion steps run synchronously before stale K/V is used.
        inner: compiler for the rewritten per-rank graph, ``"inductor"`` or ``"eager"``.
        timeout: seconds a collective or pipeline transfer of the groups the backend creates
            (and the ranks' agreement check at compile time) may wait for a peer before it
            raises; ``None`` keeps the default group's timeout (``init_process_group(timeout=)``).
        tp: tensor-parallel degree: weights split across ranks (``tensor_parallel.py``).
        tp_sequence_shard: under tensor parallel, reduce-scatter the row-parallel partial sums into
            token shards where token-local ops follow, gathering the tokens before the next
            column-parallel linear (Megatron sequence parallel, ``tp_sequence.py``).
        check_inputs: per call, check with one tiny collective that every rank got the same
            inputs (``runtime/agreement.py``); ``False`` skips it.
        reorder_comms: let inductor move the per-rank graphs' collectives and waits for overlap
            with compute (``inner_overlap.py``, docs/overlap.md); only for this backend's inner compiles.
        use_fbcache / use_teacache / cache_threshold / cache_first_steps / cache_last_steps /
            cache_num_steps / teacache_coefficients: step caching (``cache/``, docs/step_cache.md).
        memory_budget: bytes one rank may hold (an int, or a string with a unit: ``"24GiB"``); the
            report says whether the plan fits, and the automatic plan takes tensor parallel where
            whole weights do not fit (``memory.py``). ``None``: no budget, plans unchanged.
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
    # Tensor-parallel degree (tensor_parallel.py registers its mesh dim); last, so positional args keep their meaning.
    tp: int | None = None
    # Per-rank memory budget in bytes (memory.py; a string with a unit is parsed to bytes here).
    memory_budget: int | None = None
    reorder_comms: bool = True
    # Megatron sequence parallel on the tp axis (tp_sequence.py): partial sums reduce-scattered into token shards.
    tp_sequence_shard: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))
        # bool is an int subclass: True would pass as degree 1, so it is refused by name.
        for axis in axes.mesh_dim_names():
            _check_int(axis, getattr(self, axis), 1, "a positive int (1 = off)", optional=True)
        if (self.tp or 1) > 1 and (self.pp or 1) > 1:
            raise PlanError(f"tensor_parallel_degree={self.tp} with pipefusion_parallel_degree={self.pp} is not supported "
                            "yet (PipeFusion lowers only the sequence axis inside its stages): use tensor parallel with "
                            "ulysses_degree / ring_degree / use_cfg_parallel / data_parallel_degree, or PipeFusion without it")
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
        if not isinstance(self.reorder_comms, bool):
            raise PlanError(f"option reorder_comms={self.reorder_comms!r} ({type(self.reorder_comms).__name__}) is not "
                            "accepted: use True or False")
        if not isinstance(self.tp_sequence_shard, bool):
            raise PlanError(f"option tp_sequence_shard={self.tp_sequence_shard!r} ({type(self.tp_sequence_shard).__name__}) "
                            "is not accepted: use True (reduce-scatter the tensor-parallel partial sums into token "
                            "shards, Megatron sequence parallel) or False")
        if self.tp_sequence_shard and (self.tp or 1) <= 1:
            raise PlanError(f"option tp_sequence_shard=True shards the tensor-parallel partial sums, but "
                            f"tensor_parallel_degree is {self.tp}: pass tensor_parallel_degree=2 (or more) with it, "
                            "or drop tp_sequence_shard")
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
            given = options.get("cfg_degree")
            if given is not None and given != kwargs["cfg"] and not (use and isinstance(given, int) and given > 2):
                raise PlanError(f"options use_cfg_parallel={use} and cfg_degree={given!r} disagree: pass "
                                "cfg_degree alone (the number of guidance branches), or use_cfg_parallel alone")
        for key in list(options):
            if key in _option_to_field():
                kwargs[_option_to_field()[key]] = options.pop(key)
        if isinstance(kwargs.get("teacache_coefficients"), list):  # a frozen plan keeps a tuple
            kwargs["teacache_coefficients"] = tuple(kwargs["teacache_coefficients"])
        if options:
            known = sorted([*_option_to_field(), "use_cfg_parallel", "plan"])
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
        return all(getattr(self, a) is not None for a in axes.mesh_dim_names())

    def degree(self, axis: str) -> int:
        """Degree of a mesh dimension or logical axis (1 when unset)."""
        return math.prod(getattr(self, a) or 1 for a in axes.members(axis))

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, a) or 1 for a in axes.mesh_dim_names())

    def resolve(self, world_size: int, batch: int | None = None, heads: int | None = None) -> "ParallelPlan":
        """Fill unset degrees so that they multiply to ``world_size``.

        With no degree set: split the batch where it divides (cfg first), then Ulysses while
        the heads divide, then Ring. With some degrees set, the rest default to 1 and the
        product must equal the world size.
        """
        dims = axes.mesh_dim_names()
        given = {a: getattr(self, a) for a in dims if getattr(self, a) is not None}
        if given:
            resolved = {a: given.get(a, 1) for a in dims}
        else:
            resolved = dict.fromkeys(dims, 1)
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
            listing = " x ".join(f"{a}={self.degree(a)}" for a in axes.mesh_dim_names())
            fixes = self._fitting_degrees(world_size)
            hint = f"change the degrees (e.g. {' or '.join(fixes)}) or " if fixes else ""
            raise PlanError(
                f"parallel degrees {listing} = {self.world_size} do not multiply to the world size "
                f"{world_size}; {hint}launch {self.world_size} processes"
            )

    def _fitting_degrees(self, world_size: int) -> list[str]:
        """Option settings that change one degree so that the product is ``world_size`` (checked)."""
        out: list[str] = []
        # Degrees users change most readily first; cfg last (it is only 1 or 2).
        dims = sorted(axes.mesh_dim_names(), key=lambda d: (d == "cfg", d == "pp"))
        for axis in dims:
            rest = self.world_size // self.degree(axis)
            if world_size % rest:
                continue
            new = world_size // rest
            if new == self.degree(axis):
                continue
            out.append(_spell(axis, new))  # rest x new == world_size, as world_size % rest == 0
            if len(out) == 2:
                break
        return out

    # ---------------------------------------------------------------- ranks and groups
    def _grid(self) -> torch.Tensor:
        """Global ranks laid out on the mesh dimensions (row-major), as ``DeviceMesh`` lays them."""
        return torch.arange(self.world_size, device="cpu").view(*[self.degree(a) for a in axes.mesh_dim_names()])

    def coords(self, rank: int) -> dict[str, int]:
        """Index of ``rank`` along each mesh dimension."""
        where = (self._grid() == rank).nonzero()[0].tolist()
        return dict(zip(axes.mesh_dim_names(), where))

    def axis_rank(self, axis: str, rank: int) -> int:
        """Index of ``rank`` within a mesh dimension or logical axis (row-major over its dimensions)."""
        c = self.coords(rank)
        idx = 0
        for a in axes.members(axis):
            idx = idx * self.degree(a) + c[a]
        return idx

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks that vary along ``axis`` (others fixed), in axis-index order."""
        dims = axes.mesh_dim_names()
        inner = [dims.index(a) for a in axes.members(axis)]
        outer = [i for i in range(len(dims)) if i not in inner]
        grid = self._grid().permute(*outer, *inner)
        return grid.reshape(-1, self.degree(axis)).tolist()

    def describe(self) -> str:
        return " x ".join(f"{a}={self.degree(a)}" for a in axes.mesh_dim_names() if self.degree(a) > 1) or "single rank"


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
    if any(getattr(plan, a) is not None for a in axes.mesh_dim_names()) or world_size == 1:
        return plan.resolve(world_size)
    return plan


def _spell(field_name: str, value: Any = None) -> str:
    """The option users pass for a plan field (xDiT's flag name), with ``value`` when given."""
    if field_name == "cfg":
        if value is None:
            return "use_cfg_parallel"
        return f"use_cfg_parallel={value == 2}" if value in (1, 2) else f"cfg_degree={value}"
    option = {f: o for o, f in _option_to_field().items()}.get(field_name, field_name)
    return option if value is None else f"{option}={value}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_int(name: str, value: Any, low: int, accepted: str, optional: bool = False) -> None:
    """Raise ``PlanError`` naming the option unless ``value`` is an int >= ``low`` (not a bool)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        # use_cfg_parallel is checked as a bool before: a bad cfg degree came as cfg_degree.
        option = "cfg_degree" if name == "cfg" else _spell(name)
        raise PlanError(f"option {option}={_short(value)} ({type(value).__name__}) is not accepted: "
                        f"use {accepted}")


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def device_mesh(plan: ParallelPlan) -> Any:
    """torch's ``DeviceMesh`` over the plan's mesh dimensions of degree > 1 (None if there are none).

    Its dimensions are named as in ``axes.MESH_DIMS``; each logical axis spanning several of them
    is flattened into a sub-mesh of its own name, kept beside the mesh (``process_groups`` reads
    its group). Built once per plan and default group: every rank builds it in the same order, as
    ``torch.distributed`` requires (the backend checks first that the ranks agree on the plan,
    ``runtime/agreement.py``). With ``plan.timeout`` set, every group gets that timeout, the
    whole world included (a new group of every rank, not the default one, whose timeout belongs
    to the user).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError(
            "xdit needs a torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group() (gloo on CPU, nccl on GPU) before compiling"
        )
    from torch.distributed.device_mesh import init_device_mesh

    dims = tuple(d for d in axes.mesh_dim_names() if plan.degree(d) > 1)
    key = _mesh_key(plan)
    cache, _ = current().group_cache(dist.group.WORLD)
    if key not in cache:
        mesh, flat = None, {}
        if dims:
            override = None if plan.timeout is None else {d: _timeout_options(plan) for d in dims}
            mesh = init_device_mesh(_device_type(), tuple(plan.degree(d) for d in dims), mesh_dim_names=dims,
                                    backend_override=override)
            for spec in axes.AXES:
                live = tuple(d for d in spec.mesh_dims if d in dims)
                if len(live) > 1:  # kept here: torch deprecates slicing a flattened dim off the root mesh
                    flat[spec.name] = mesh[live]._flatten(spec.name, backend_override=None if plan.timeout is None
                                                          else _timeout_options(plan))
        cache[key] = {"mesh": mesh, **flat}
    return cache[key]["mesh"]


def process_groups(plan: ParallelPlan) -> dict[str, Any]:
    """This rank's ``ProcessGroup`` for every mesh dimension and logical axis of degree > 1."""
    mesh = device_mesh(plan)
    if mesh is None:
        return {}
    flat = current().group_cache(dist.group.WORLD)[0][_mesh_key(plan)]
    dims = {d: mesh.get_group(d) for d in mesh.mesh_dim_names}
    out: dict[str, Any] = {}  # the logical axes first: messages name a group by its first axis
    for spec in axes.AXES:
        live = [d for d in spec.mesh_dims if plan.degree(d) > 1]
        if len(live) == 1:
            out[spec.name] = dims[live[0]]
        elif live:
            out[spec.name] = flat[spec.name].get_group()
    return {**out, **dims}


def _mesh_key(plan: ParallelPlan) -> tuple:
    return tuple(plan.degree(a) for a in axes.mesh_dim_names()) + (dist.get_world_size(), plan.timeout)


def _device_type() -> str:
    """The mesh's device type: CUDA when the default group runs NCCL, else CPU (gloo)."""
    return "cuda" if torch.cuda.is_available() and "nccl" in str(dist.get_backend()) else "cpu"


def _timeout_options(plan: ParallelPlan) -> Any:
    from torch._C._distributed_c10d import Backend as C10dBackend

    return C10dBackend.Options(str(dist.get_backend()).split(":")[-1], plan.timeout_delta)


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
