"""Keeping the pipeline full across steps: ``run_steps``.

Called once per denoising step, a PipeFusion graph fills and drains its pipeline in every
call: the last stage cannot start step ``t + 1`` before the caller has the whole output of
step ``t``, so a step takes about ``(M + P - 1) / M`` of a perfectly overlapped one. When the
caller hands over the whole loop as a *step function* whose graph computes the next latent
from the current one (model call, guidance and the scheduler update all inside it), patch
``i`` of step ``t + 1`` needs only patch ``i`` of step ``t``'s latent, so it can enter stage 0
while the later patches of step ``t`` are still in the pipeline::

    latents = xdit_compile.pipefusion.run_steps(step, latents, [(t0, dt0), (t1, dt1), ...])
    # same result as:  for args in steps: latents = step(latents, *args)

The last stage writes each finished patch of the new latent into its copy and sends it to
every stage that reads the latent (stage 0 for the patch embedding); those stages apply it
before running the next step's patch. Every stage runs its patches in the same order as the
per-call schedule and every patch program reads the same values, so the result equals the
plain loop's (the same stale K/V), bit for bit; only the waiting goes. The pipeline fills
once and drains once per ``run_steps`` instead of once per step.

What the step function must satisfy (checked; a ``PlanError`` says which part fails):

* it compiles into one PipeFusion graph (no graph break) whose output it returns unchanged,
  and the latent is passed to it unchanged as a tensor argument;
* the latent is patch-split (each patch program reads only its rows of it, through the
  slices the lowering inserted) and the output of patch ``i`` covers at least the rows
  patch ``i`` of the next step reads (``R_i ⊆ O_0 ∪ ... ∪ O_i``), i.e. the update acts on
  each token independently (Euler, DDIM, flow matching; CFG's combination of halves);
* the other arguments of every step are known up front (timesteps, step sizes).

The first steps (``warmup_steps``, full sequence) run as plain calls; a graph without
patches (``num_pipeline_patch=1``), or a function that is not PipeFusion-compiled, simply
runs the plain loop.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from ..errors import PlanError
from ..graph import op_name, value
from . import p2p
from ..context import current
from .driver import PipelineDriver, Timing
from .programs import Assembly
from .split import StageGraph

Rows = tuple[int, list[torch.Tensor]]  # (dim, per patch: the global positions along dim, in local order)


@dataclass
class PatchLayout:
    """Which rows of each input every patch program reads, and where each output leaf's patch goes.

    ``reads[j]``: for flat input ``j``, per patch a dict {dim: global positions read along it}
    (dims absent are read whole); ``None`` when some patch reads the input other than through
    the lowering's slices. ``writes[k]``: for output leaf ``k``, (dim, per patch positions) of
    the patch's piece, or ``None`` when it is not split over the patches. ``stage_inputs``:
    per patch, per stage, the flat inputs that stage's program reads.
    """

    reads: dict[int, list[dict[int, torch.Tensor]] | None]
    writes: list[Rows | None]
    stage_inputs: list[list[set[int]]]

    @staticmethod
    def build(patch_graphs: Sequence[fx.GraphModule], splits: Sequence[Sequence[StageGraph]],
              assembly: Assembly) -> "PatchLayout":
        reads: dict[int, list[dict[int, torch.Tensor]] | None] = {}
        for g in patch_graphs:
            for j, p in enumerate(n for n in g.graph.nodes if n.op == "placeholder"):
                got = _rows_read(p)
                if j not in reads or reads[j] is not None:
                    reads[j] = None if got is None else [*(reads.get(j) or []), got]
        return PatchLayout(reads, _rows_written(patch_graphs, assembly),
                           [[set(st.inputs) for st in split] for split in splits])

    def token_rows(self, index: int) -> Rows | None:
        """(dim, per patch rows) of input ``index`` along the one dim its patches split, else None."""
        per_patch = self.reads.get(index)
        if not per_patch:
            return None
        if any(set(r) != set(per_patch[0]) for r in per_patch):
            return None  # some patch reads a dim whole that another slices
        split = [d for d in per_patch[0] if any(not torch.equal(r[d], per_patch[0][d]) for r in per_patch)]
        if len(split) != 1:
            return None
        return split[0], [r[split[0]] for r in per_patch]


def _rows_read(p: fx.Node) -> dict[int, torch.Tensor] | None:
    """Global positions of ``p`` read along each sliced dim, following chains of ``xdit_slice``.

    None when ``p`` itself is read whole; a dim missing from the result is read whole.
    """
    leaves: list[dict[int, torch.Tensor]] = []

    def walk(node: fx.Node, rows: dict[int, torch.Tensor]) -> bool:
        slices = [u for u in node.users if op_name(u) == "xdit_slice" and u.args[0] is node]
        if len(slices) < len(node.users):
            if node is p:
                return False
            leaves.append(rows)
        for u in slices:
            dim, ranges = u.args[1] % value(node).dim(), u.args[2]
            local = torch.cat([torch.arange(s, s + n) for s, n in ranges])
            if not walk(u, {**rows, dim: rows[dim][local] if dim in rows else local}):
                return False
        return True

    if not walk(p, {}):
        return None
    dims = set.intersection(*[set(r) for r in leaves]) if leaves else set()
    return {d: torch.unique(torch.cat([r[d] for r in leaves])) for d in dims}


def _rows_written(patch_graphs: Sequence[fx.GraphModule], assembly: Assembly) -> list[Rows | None]:
    """Per output leaf, the global positions of each patch's piece (by assembling position ids)."""
    outs = [tree_flatten(next(n for n in g.graph.nodes if n.op == "output").args[0])[0] for g in patch_graphs]
    ids: list[list[torch.Tensor]] = [[] for _ in patch_graphs]
    offsets = [0] * len(assembly.gathers)
    for i, leaves in enumerate(outs):
        for k, gather in enumerate(assembly.gathers):
            if gather is None:
                ids[i].append(torch.zeros(()))
                continue
            dim, length = gather[0], value(leaves[k]).shape[gather[0]]
            ids[i].append(torch.arange(offsets[k], offsets[k] + length).reshape([1] * dim + [length]))
            offsets[k] += length
    full = assembly(ids)
    writes: list[Rows | None] = []
    for k, gather in enumerate(assembly.gathers):
        if gather is None:
            writes.append(None)
            continue
        where = torch.argsort(full[k].reshape(-1))  # where[id] = global position of that id
        per_patch = [where[x.reshape(-1)] for x in (ids[i][k] for i in range(len(patch_graphs)))]
        writes.append((gather[0], per_patch))
    return writes


@contextlib.contextmanager
def capture() -> Iterator[list[tuple[PipelineDriver, tuple[Any, ...], list[Any]]]]:
    """PipeFusion drivers called inside record (driver, flat args, zero outputs) and run nothing."""
    captures = current().captures
    captures.append([])
    try:
        yield captures[-1]
    finally:
        captures.pop()


def _captured(fn: Callable[..., Any], latents: torch.Tensor, args: Sequence[Any]) -> tuple[PipelineDriver, list[Any], int, int] | None:
    """(driver, flat args, latent's flat index, output leaf index) of one step; None: not PipeFusion."""
    with capture() as calls:
        result = fn(latents, *args)
    if not calls:
        return None
    if len(calls) > 1:
        raise PlanError(f"run_steps: the step function ran {len(calls)} PipeFusion graphs (a graph break?); it must "
                        "compile into one graph: remove the break, or call it in a plain loop")
    driver, flat, outs = calls[0]
    index = next((j for j, a in enumerate(flat) if a is latents), None)
    leaf = next((k for k, o in enumerate(outs) if o is result), None)
    if index is None or leaf is None:
        raise PlanError("run_steps: the step function must pass the latent to the compiled graph unchanged and return "
                        "the graph's output unchanged (compile the whole step: model, guidance and scheduler update)")
    return driver, list(flat), index, leaf


def run_steps(fn: Callable[..., torch.Tensor], latents: torch.Tensor, steps: Sequence[Sequence[Any]]) -> torch.Tensor:
    """``for args in steps: latents = fn(latents, *args)``, with the pipeline kept full across steps.

    ``fn`` is a ``torch.compile(..., backend="xdit")`` function with PipeFusion options whose
    graph maps the latent to the next latent (see the module docstring for what it must
    satisfy). Every rank calls this with the same arguments and gets the final latent.
    """
    x = latents
    for t, args in enumerate(steps):
        got = _captured(fn, x, args)
        if got is None or not got[0].patches:
            x = fn(x, *args)  # not (yet) compiled, or no patches: a plain call
            continue
        driver = got[0]
        if copy.deepcopy(driver.state).on_call(driver.step_key(got[1]))[2]:
            x = fn(x, *args)  # a warmup (full-sequence) step
            continue
        records = [got[1]] + [_same_graph(got, _captured(fn, x, a)) for a in steps[t + 1:]]
        return _stream(driver, records, got[2], got[3], x)
    return x


def _same_graph(first: tuple[PipelineDriver, list[Any], int, int],
                got: tuple[PipelineDriver, list[Any], int, int] | None) -> list[Any]:
    if got is None or got[0] is not first[0] or got[2:] != first[2:]:
        raise PlanError("run_steps: a later step recompiled the step function (its arguments' shapes, dtypes or "
                        "Python values changed): pass tensors of one shape for every step")
    return got[1]


def _plan(driver: PipelineDriver, index: int, leaf: int, x: torch.Tensor) -> tuple[int, list[torch.Tensor], list[torch.Tensor], list[int]]:
    """(dim, rows read per patch, rows written per patch, stages reading the latent); checked."""
    layout: PatchLayout = driver.layout
    read = layout.token_rows(index)
    written = layout.writes[leaf]
    if read is None:
        raise PlanError("run_steps: the latent is not split into patches (some patch program reads all of it, or it is "
                        "not the input the patches split); call the step function in a plain loop")
    if written is None or written[0] != read[0] or driver.out_leaves[leaf].shape != tuple(x.shape):
        raise PlanError("run_steps: the step function's output must have the latent's shape and be split into patches "
                        "along the same dim as the latent")
    dim = read[0]
    for i, rows in enumerate(read[1]):
        have = torch.cat(written[1][:i + 1])
        if not torch.isin(rows, have).all():
            raise PlanError(f"run_steps: patch {i} of a step reads latent rows that patches 0..{i} of the step before "
                            "do not write (the update is not per token); call the step function in a plain loop")
    readers = sorted({s for per_stage in layout.stage_inputs for s, inputs in enumerate(per_stage) if index in inputs})
    return dim, read[1], written[1], readers


def _tag(t: int, i: int, patches: int, update: bool = False) -> int:
    return (2 * t + int(update)) * patches + i


def _stream(driver: PipelineDriver, records: list[list[Any]], index: int, leaf: int, x: torch.Tensor) -> torch.Tensor:
    """Run every recorded step through the pipeline without draining it between steps."""
    topo, progs = driver.topo, driver.patches
    m, last = len(progs), topo.stages - 1
    dim, _, writes, readers = _plan(driver, index, leaf, x)
    ranks = list(topo.ranks)
    sends_to = [ranks[s] for s in readers if s != last] if topo.stage == last else []
    gets_updates = topo.stage in readers and topo.stage != last
    meta = [(s, x.dtype) for s in (tuple(x.shape[:dim]) + (len(w),) + tuple(x.shape[dim + 1:]) for w in writes)]
    cur = x.clone()
    nxt = x.clone()  # the last stage writes the next latent here while this step still reads ``cur``
    pending: list[p2p.Pending] = []
    start, compute = time.perf_counter(), 0.0
    with torch.no_grad(), driver.store.current(0):
        for t, args in enumerate(records):
            step, stream, full = driver.state.on_call(driver.step_key(args))
            if full or stream:
                raise PlanError(f"run_steps: step {step} would need a full-sequence call (stream {stream}); "
                                "the recorded steps must all be patch steps of one stream")
            driver.calls.append((step, stream, False))
            recvs = [p2p.irecv(p.graph.recv, topo.prev, tag=_tag(t, i, m), device=x.device) for i, p in enumerate(progs)] \
                if topo.prev is not None else []
            updates = [p2p.irecv([meta[i]], ranks[last], tag=_tag(t - 1, i, m, True), device=x.device) for i in range(m)] \
                if gets_updates and t > 0 else []
            applied = 0
            for i, p in enumerate(progs):
                while updates and applied <= i:  # patches 0..i of the step before cover patch i's rows
                    cur.index_copy_(dim, writes[applied], updates[applied].wait()[0])
                    applied += 1
                vals = [cur if j == index else args[j] for j in p.graph.inputs] + (recvs[i].wait() if recvs else [])
                begin = time.perf_counter()
                out = p.fn(*vals)
                compute += time.perf_counter() - begin
                if topo.next is not None:
                    pending.append(p2p.isend(list(out), topo.next, tag=_tag(t, i, m)))
                    continue
                y = tree_flatten(out)[0][leaf]
                nxt.index_copy_(dim, writes[i], y)
                if t + 1 < len(records):
                    pending += [p2p.isend([y], r, tag=_tag(t, i, m, True)) for r in sends_to]
            driver.state.done(stream, False)
            if topo.stage == last:
                cur.copy_(nxt)
        for work in pending:
            work.wait()
    out = p2p.broadcast([cur] if topo.stage == last else None, [(tuple(x.shape), x.dtype)], topo.last, topo.group,
                        x.device)[0]
    driver.timings.append(Timing("stream", len(records), time.perf_counter() - start, compute))
    return out
