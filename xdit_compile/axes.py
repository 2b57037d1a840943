"""The axis registry: the mesh dimensions a plan has, and the logical axes the passes lower.

Two tables, both built at import and extended with ``register_*`` (the tensor-parallel axis is
meant to arrive that way: one ``MeshDim``, one ``AxisSpec``, plus its rules):

``MESH_DIMS``  the dimensions of the device mesh, outermost first (rank = row-major index)::

    dp -> cfg -> pp -> ring -> ulysses (-> tp, registered by tensor_parallel.py)

  Ulysses is innermost of the built-ins because its all-to-alls are the most bandwidth-hungry: its ranks are
  neighbours (the same node under ``torchrun``). Each dimension is a ``ParallelPlan`` field of
  the same name and has an xDiT option name.

``AXES``  the logical axes, in the order the backend plans and lowers them. A logical axis
  groups one or more mesh dimensions into one 1-D placement problem::

    batch = dp x cfg     seeds only batch dims; lowered before PipeFusion splits the stages
    sp    = ring x ulysses  never seeds a batch dim; lowered inside every stage

  A rank's index on a logical axis is row-major over its mesh dimensions (sp index =
  ``ring_index * ulysses + ulysses_index``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import PlanError

# Names the rest of the package uses for the two built-in logical axes.
BATCH = "batch"
SEQUENCE = "sp"


@dataclass(frozen=True)
class MeshDim:
    """One dimension of the device mesh: a ``ParallelPlan`` field and the option that sets it."""

    name: str
    option: str  # xDiT's flag name, for messages that tell the user what to pass
    doc: str


@dataclass(frozen=True)
class AxisSpec:
    """A logical axis: which mesh dimensions it spans and how the passes treat it.

    Args:
        name: the axis name (``node.meta``, reports, annotations, ``Axis.name``).
        mesh_dims: the mesh dimensions it spans, outermost first.
        seeds_batch_dim: the plan search seeds only dim 0 of the batch-sized inputs (the batch
            axis) instead of every other dim (the sequence axis).
        strategies: the attention strategies that may lower a token-sharded attention on this
            axis (``strategies/registry.py`` tries them in its own order), or ``None``: every
            registered strategy, each deciding by its ``why_not``.
        inside_stages: under PipeFusion, lowered inside every stage program (else on the whole
            graph before the stages are cut).
        empty_hint: appended to the report's "nothing to split" note for this axis.
        sub_groups: extra ``Axis`` fields (sub-dimension sizes and groups) built from the plan's
            degrees and this rank's groups, e.g. the Ulysses and Ring groups USP needs.
    """

    name: str
    mesh_dims: tuple[str, ...]
    seeds_batch_dim: bool
    strategies: tuple[str, ...] | None
    inside_stages: bool
    empty_hint: str = ""
    sub_groups: Callable[[Callable[[str], int], Mapping[str, Any]], dict[str, Any]] | None = None
    # The axis's own plan search ``(gm, n, forced, plan=) -> Propagation`` in place of ``choose_seeds``
    # (tensor parallel seeds parameters, not user inputs), and a hook run after its lowering
    # ``(gm, prop, axis, example_inputs, axis_report) -> None`` (tensor parallel splits the weights).
    choose: Callable[..., Any] | None = None
    after_lower: Callable[..., None] | None = None


def _sp_sub_groups(degree: Callable[[str], int], groups: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = dict(ulysses=degree("ulysses"), ring=degree("ring"))
    if kw["ulysses"] > 1 and kw["ring"] > 1:
        kw.update(ulysses_group=groups["ulysses"].group_name, ring_group=groups["ring"].group_name)
    return kw


MESH_DIMS: list[MeshDim] = [
    MeshDim("dp", "data_parallel_degree", "splits the batch"),
    MeshDim("cfg", "cfg_degree", "CFG: the guidance branches (batch halves, or calls of one step) on rank groups"),
    MeshDim("pp", "pipefusion_parallel_degree", "PipeFusion: the blocks in pipeline stages"),
    MeshDim("ring", "ring_degree", "splits the tokens; K/V travel around a ring"),
    MeshDim("ulysses", "ulysses_degree", "splits the tokens; all-to-all swaps tokens for heads"),
]

AXES: list[AxisSpec] = [
    AxisSpec(BATCH, ("dp", "cfg"), seeds_batch_dim=True, strategies=("ring",), inside_stages=False,
             empty_hint=" (batch too small: a pipeline that calls the model once per CFG half gives it"
                        " batch 1; see docs/pipelines.md)"),
    AxisSpec(SEQUENCE, ("ring", "ulysses"), seeds_batch_dim=False, strategies=None,
             inside_stages=True, sub_groups=_sp_sub_groups),
]


def mesh_dim_names() -> tuple[str, ...]:
    return tuple(d.name for d in MESH_DIMS)


def axis_names() -> tuple[str, ...]:
    return tuple(a.name for a in AXES)


def axis_spec(name: str) -> AxisSpec:
    """The spec of logical axis ``name``; a ``PlanError`` naming the registered ones otherwise."""
    for spec in AXES:
        if spec.name == name:
            return spec
    raise PlanError(f"no parallel axis named {name!r}; registered axes: {list(axis_names())} "
                    "(register one with xdit_compile.axes.register_axis)")


def members(name: str) -> tuple[str, ...]:
    """The mesh dimensions of a logical axis, or ``(name,)`` for a mesh dimension itself."""
    for spec in AXES:
        if spec.name == name:
            return spec.mesh_dims
    if name in mesh_dim_names():
        return (name,)
    raise PlanError(f"no mesh dimension or parallel axis named {name!r}; mesh dimensions: "
                    f"{list(mesh_dim_names())}, axes: {list(axis_names())}")


def option_of(dim: str) -> str:
    return next((d.option for d in MESH_DIMS if d.name == dim), dim)


def register_mesh_dim(dim: MeshDim, after: str | None = None) -> None:
    """Add a mesh dimension (after the one named ``after``, else innermost).

    ``ParallelPlan`` must have a field of the same name (``tests/test_axes.py`` checks it).
    """
    if dim.name in mesh_dim_names():
        raise PlanError(f"mesh dimension {dim.name!r} is already registered")
    at = len(MESH_DIMS) if after is None else mesh_dim_names().index(after) + 1
    MESH_DIMS.insert(at, dim)


def register_axis(spec: AxisSpec, before: str | None = None) -> None:
    """Add a logical axis (lowered before the one named ``before``, else last)."""
    if spec.name in axis_names():
        raise PlanError(f"parallel axis {spec.name!r} is already registered")
    unknown = [d for d in spec.mesh_dims if d not in mesh_dim_names()]
    if unknown:
        raise PlanError(f"axis {spec.name!r} spans unknown mesh dimensions {unknown}; register them first "
                        f"(mesh dimensions: {list(mesh_dim_names())})")
    taken = [d for d in spec.mesh_dims for a in AXES if d in a.mesh_dims]
    if taken:
        raise PlanError(f"axis {spec.name!r}: mesh dimensions {taken} already belong to another axis")
    at = len(AXES) if before is None else axis_names().index(before)
    AXES.insert(at, spec)
