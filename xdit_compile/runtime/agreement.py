"""Ranks that disagree: named once per compiled graph, before the first collective.

Every rank writes a fingerprint of what it is about to compile into the default group's
store, then waits (bounded by the plan's ``timeout``, else the default group's timeout) for
every other rank's:

    plan      the resolved ParallelPlan (degrees, patches, warmup, inner, timeout, check_inputs)
    graph     one line per traced node (op, target, arguments), compared through a hash
    inputs    each user input's label, shape and dtype
    weights   a float64 sum of every parameter and buffer

The store, not a collective: ranks that disagree about the plan would create different
process groups (``dist.new_group`` deadlocks) or post collectives of different sizes (gloo
aborts with "Received data size doesn't match expected size"). Each rank reads back only the
others' digests; when they differ, every rank reads the differing fingerprints and raises the
same ``RankMismatchError``. A rank whose options make no plan tells the others. A weight whose
storage a rank freed (PipeFusion keeps its stage's) has no checksum there and is compared on
the ranks that hold it.

``guard.checked`` runs ``agree`` before the backend compiles; ``guard.Guarded`` checks the
inputs of every call and ``timeouts.name_timeout`` names a stuck peer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.fx as fx

from ..errors import CollectiveTimeoutError, PlanError, RankMismatchError
from ..facts import graph_facts
from ..graph import input_label, is_user_input
from ..axes import mesh_dim_names
from ..plan import ParallelPlan

_SEQ = itertools.count()  # agreement rounds of this process; every rank counts the same ones
_PREFIX = "xdit/agree"
MAX_LISTED = 4  # differences listed per kind before "and N more"
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def user_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[tuple[int, str]]:
    """(flat index, label) of the caller's tensor arguments (not parameters or buffers)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(i, input_label(n)) for i, n in enumerate(phs)
            if i < len(example_inputs) and isinstance(example_inputs[i], torch.Tensor) and is_user_input(n)]


# ---------------------------------------------------------------------- 1. agreement
@dataclass(frozen=True)
class Fingerprint:
    """What one rank is about to compile; ranks must hold equal ones (``options`` aside).

    Only the summary (everything but ``graph`` and ``weights``, which enter through their
    hashes) goes to the store every time; the two lists, large for a big model, are written
    only when the digests differ and the message needs them.
    """

    plan: dict[str, str]  # field -> repr of the resolved plan ({} when the plan failed)
    describe: str  # plan.describe(), or the PlanError's text
    error: str  # the PlanError this rank raised ("" when none)
    inputs: list[list[str]]  # [label, shape, dtype] of each user input
    options: str  # the options as given, for messages only (equal plans from different options agree)
    graph: list[str]  # one line per node
    weights: list[list[Any]]  # [name, shape and dtype, float64 sum or None when freed]

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("graph", "weights")}
        return out | {"graph": _hash(self.graph), "nodes": len(self.graph), "weights": _hash(self.weights)}

    def details(self) -> dict[str, Any]:
        return {"graph": self.graph, "weights": self.weights}

    def digest(self) -> str:
        s = self.summary()
        return _hash([s["plan"], s["error"], s["inputs"], s["graph"], s["weights"]])


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def agree(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None) -> ParallelPlan:
    """The resolved plan, once every rank is known to compile the same thing (see module docstring).

    Raises ``RankMismatchError`` on every rank when fingerprints differ, ``CollectiveTimeoutError``
    when a rank does not arrive in time, and this rank's own ``PlanError`` when its options
    make no plan (after telling the other ranks, which then raise ``RankMismatchError``).
    """
    plan = plan_or_tell(gm, example_inputs, options)
    fp = _fingerprint(gm, example_inputs, options, plan, "")
    wait = plan.timeout if plan.timeout is not None else _store().timeout.total_seconds()
    _exchange(fp, wait)
    return plan


def plan_or_tell(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None) -> ParallelPlan:
    """The resolved plan; on a ``PlanError``, publish it first so that the other ranks stop waiting."""
    try:
        return ParallelPlan.from_options(options).resolve(dist.get_world_size(), *graph_facts(gm))
    except PlanError as e:
        _publish(_fingerprint(gm, example_inputs, options, None, str(e)))
        raise


def _fingerprint(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None,
                 plan: ParallelPlan | None, error: str) -> Fingerprint:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs, weights, sums = [], [], []
    for n, x in zip(phs, example_inputs):
        if not isinstance(x, torch.Tensor):
            if is_user_input(n):
                inputs.append([input_label(n), repr(x), type(x).__name__])
            continue
        if is_user_input(n):
            inputs.append([input_label(n), str(tuple(x.shape)), str(x.dtype)])
        else:
            weights.append([_weight_name(n), f"{tuple(x.shape)} {x.dtype}", None])
            sums.append((len(weights) - 1, x))
    for i, value in zip([i for i, _ in sums], _sums([x for _, x in sums])):
        weights[i][2] = value
    described = plan.describe() if plan is not None else error
    plan_fields = {f.name: repr(getattr(plan, f.name)) for f in fields(plan)} if plan is not None else {}
    try:
        shown = repr(dict(options or {}))
    except Exception:  # noqa: BLE001 - options that are not a mapping are already a PlanError
        shown = repr(options)
    return Fingerprint(plan_fields, described, error, inputs, shown, [_node_line(n) for n in gm.graph.nodes],
                       weights)


def _weight_name(node: fx.Node) -> str:
    """``blocks.0.attn.to_q.weight`` from Dynamo's ``L['self']._modules['blocks']...`` source."""
    label = input_label(node)
    parts = re.findall(r"\['([^']*)'\]|\.(\w+)", label.split("L['self']", 1)[-1])
    names = [a or b for a, b in parts if (a or b) not in ("_modules", "_parameters", "_buffers")
             and not (a or b).startswith("__")]
    return ".".join(names) if "L['self']" in label and names else label


def _node_line(node: fx.Node) -> str:
    target = node.target
    if not isinstance(target, str):
        target = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
    line = f"{node.op} {node.name} {target} {node.args} {node.kwargs}"
    return _ADDRESS.sub("", line)[:240]


def _sums(tensors: Sequence[torch.Tensor]) -> list[float | None]:
    """float64 sum of each tensor (None for freed, meta or fake storage), one host sync per device."""
    out: list[float | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, x in enumerate(tensors):
        if x.device.type == "meta" or _is_fake(x) or (x.numel() and x.untyped_storage().nbytes() == 0):
            continue
        by_device.setdefault(x.device, []).append((i, _total(x)))
    for items in by_device.values():
        for (i, _), v in zip(items, torch.stack([s for _, s in items]).tolist()):
            out[i] = v
    return out


def _is_fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def _total(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    return torch.sum(x, dtype=torch.float64)


def _store() -> dist.Store:
    return c10d._get_default_store()


def _publish(fp: Fingerprint) -> tuple[str, int]:
    """Write this rank's fingerprint, then its digest (readers wait on digests); the key prefix."""
    prefix, rank = f"{_PREFIX}/{next(_SEQ)}/", dist.get_rank()
    store = _store()
    store.set(f"{prefix}fp/{rank}", json.dumps(fp.summary()))
    store.set(f"{prefix}digest/{rank}", fp.digest())
    return prefix, rank


def _exchange(fp: Fingerprint, wait_s: float) -> None:
    prefix, rank = _publish(fp)
    world, store = dist.get_world_size(), _store()
    keys = [f"{prefix}digest/{r}" for r in range(world)]
    start = time.monotonic()
    _wait(store, keys, wait_s, start, rank, prefix)
    digests = [d.decode() if isinstance(d, bytes) else d for d in store.multi_get(keys)]
    if len(set(digests)) == 1:
        return
    # Every rank sees the mismatch: each writes its details, then reads those of one rank per group.
    store.set(f"{prefix}details/{rank}", json.dumps(fp.details()))
    groups: dict[str, list[int]] = {}
    for r, d in enumerate(digests):
        groups.setdefault(d, []).append(r)
    summaries = {d: json.loads(store.get(f"{prefix}fp/{ranks[0]}")) for d, ranks in groups.items()}
    if any(s["error"] for s in summaries.values()):  # the message names the error alone
        prints = {d: Fingerprint(**_fields(s), graph=[], weights=[]) for d, s in summaries.items()}
    else:
        reps = {d: ranks[0] for d, ranks in groups.items()}
        _wait(store, [f"{prefix}details/{r}" for r in reps.values()], wait_s, start, rank, prefix)
        prints = {d: Fingerprint(**_fields(summaries[d]), **json.loads(store.get(f"{prefix}details/{r}")))
                  for d, r in reps.items()}
    message = explain([(ranks, prints[d]) for d, ranks in groups.items()])
    if message is not None:  # None: only weights freed on some ranks (PipeFusion's other stages) differ
        raise RankMismatchError(message)


def _fields(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("plan", "describe", "error", "inputs", "options")}


def _wait(store: dist.Store, keys: list[str], wait_s: float, start: float, rank: int, prefix: str) -> None:
    """Wait for ``keys`` (one per rank) until ``wait_s`` after ``start``; name the ranks that never wrote."""
    try:
        store.wait(keys, timedelta(seconds=max(wait_s - (time.monotonic() - start), 0.1)))
    except RuntimeError as e:  # DistStoreError: some rank never arrived
        missing = [int(k.rsplit("/", 1)[1]) for k in keys if not store.check([k])]
        raise CollectiveTimeoutError(
            f"xdit: rank {rank} waited {time.monotonic() - start:.0f} s (timeout {wait_s:g} s) for rank(s) {missing} "
            f"to compile the same graph (agreement round {prefix.split('/')[-2]}, before any collective); they are "
            "stuck, died, or compile a different number of graphs (a graph break on some ranks only). Their "
            "tracebacks show where they are; raise the option timeout if they legitimately need longer."
        ) from e


def explain(groups: list[tuple[list[int], Fingerprint]]) -> str | None:
    """The message for ranks holding different fingerprints (``groups[0]`` holds rank 0).

    None when nothing differs that matters: a weight whose storage one rank freed (PipeFusion
    keeps only its stage's weights) has no checksum there, so its digest differs harmlessly.
    """
    (ref_ranks, ref), lines = groups[0], []
    for ranks, fp in groups[1:]:
        lines += _differences(list_ranks(ranks), list_ranks(ref_ranks), fp, ref)
    if not lines:
        return None
    return ("xdit: the ranks disagree about what they compile, so their collectives would not match (a hang or a "
            "wrong image); every rank must compile the same model, weights, options and input shapes:\n  - "
            + "\n  - ".join(lines))


def list_ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _differences(who: str, ref_who: str, fp: Fingerprint, ref: Fingerprint) -> list[str]:
    has = "has" if who.startswith("rank ") else "have"
    out = []
    for name, other in ((who, fp), (ref_who, ref)):
        if other.error:
            out.append(f"{name} could not build its plan from options {other.options}: {other.error}")
    if out:
        return out
    if fp.plan != ref.plan:
        if fp.describe != ref.describe:
            out.append(f"{who} {has} plan {fp.describe} but {ref_who} has {ref.describe} "
                       f"(options {fp.options} vs {ref.options})")
        others = [f for f in fp.plan if f not in mesh_dim_names() and fp.plan[f] != ref.plan.get(f)]
        out += [f"{who} {has} {f}={fp.plan[f]} but {ref_who} has {f}={ref.plan.get(f)}" for f in others]
    shapes = len(out)
    mine, theirs = {i[0]: i[1:] for i in fp.inputs}, {i[0]: i[1:] for i in ref.inputs}
    for label in [*mine, *[t for t in theirs if t not in mine]]:
        a, b = mine.get(label), theirs.get(label)
        if a != b:
            show = lambda v: "no such input" if v is None else f"{v[0]} {v[1]}"  # noqa: E731
            out.append(f"input {label}: shape {show(a)} on {who}, {show(b)} on {ref_who}")
    if fp.graph != ref.graph and len(out) == shapes:  # other input shapes trace other graphs: said already
        first = next((i for i, (a, b) in enumerate(zip(fp.graph, ref.graph)) if a != b), min(len(fp.graph), len(ref.graph)))
        at = lambda g: g[first] if first < len(g) else "(end of graph)"  # noqa: E731
        out.append(f"the traced graphs differ: {who} {has} {len(fp.graph)} nodes, {ref_who} {len(ref.graph)}; first "
                   f"difference at node {first}: {at(fp.graph)!r} on {who}, {at(ref.graph)!r} on {ref_who} (the "
                   "model code or its Python-level arguments differ between ranks)")
    if fp.weights != ref.weights:
        out += _weight_differences(who, ref_who, fp.weights, ref.weights)
    return out


def _weight_differences(who: str, ref_who: str, mine: list[list[Any]], ref: list[list[Any]]) -> list[str]:
    theirs = {w[0]: w for w in ref}
    diffs = []
    for name, spec, total in mine:
        other = theirs.get(name)
        if other is None:
            diffs.append(f"{name} ({spec}) exists on {who} only")
        elif other[1] != spec:
            diffs.append(f"{name} is {spec} on {who} but {other[1]} on {ref_who}")
        elif total is not None and other[2] is not None and not same(total, other[2]):
            diffs.append(f"{who}'s checksum of {name} is {total!r} but {ref_who}'s is {other[2]!r}")
    mine_names = {w[0] for w in mine}
    diffs += [f"{name} ({spec}) exists on {ref_who} only" for name, spec, _ in ref if name not in mine_names]
    if not diffs:
        return []
    more = f" (and {len(diffs) - MAX_LISTED} more)" if len(diffs) > MAX_LISTED else ""
    return [f"parameters differ: {'; '.join(diffs[:MAX_LISTED])}{more}; load the same weights on every rank "
            "(the same seed before building the model, or the same checkpoint)"]


def same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN equals NaN here: both ranks got the same NaN
