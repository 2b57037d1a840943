"""The callable a PipeFusion-compiled graph returns: runs this rank's stage over the patches.

Per call (one transformer forward), on the stage ``s`` of ``P``::

    full step (warmup, or M = 1):  recv(s-1) -> stage program -> send(s+1)          once
    patch step:                    for patch i in 0..M-1: recv_i(s-1) -> stage_i -> isend_i(s+1)
    last stage: assemble the patches; broadcast the output to every stage

Receives are posted before any compute and sends are asynchronous, so stage ``s`` works on
patch ``i + 1`` while patch ``i`` travels to stage ``s + 1``. The pipeline fills and drains
within each call (a bubble of ``(P - 1) / (M + P - 1)`` of a step's time); ``stream.run_steps``
keeps it full across steps where the caller hands over the whole loop. Every call's wall
time and the time spent inside this rank's stage programs are kept in ``timings``: the rest
is the bubble (waiting for a neighbour, transfers, the output broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import time

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..branches.calls import current_branch
from ..context import current
from ..runtime.devices import device_of
from . import p2p
from .kv import KVStore, StepState
from .programs import Assembly
from .split import StageGraph


@dataclass
class StageProgram:
    graph: StageGraph
    fn: Callable[..., Any]


@dataclass
class Topology:
    stage: int
    stages: int
    prev: int | None  # global ranks of the neighbours
    next: int | None
    last: int  # global rank of the last stage of this pipeline
    group: Any  # the pp process group
    ranks: tuple[int, ...] = ()  # global rank of every stage of this pipeline


@dataclass(frozen=True)
class Timing:
    """One driver run: wall seconds, and seconds spent inside this rank's stage programs."""

    kind: str  # "full", "patches" or "stream"
    steps: int
    wall: float
    compute: float

    @property
    def bubble(self) -> float:
        """Share of the wall time this rank was not computing (waiting, transfers, broadcast)."""
        return 1.0 - self.compute / self.wall if self.wall > 0 else 0.0


class PipelineDriver:
    """See the module docstring."""

    def __init__(self, topo: Topology, full: StageProgram, patches: list[StageProgram], assembly: Assembly | None,
                 out_template: tuple[list[Any], Any], key_inputs: list[int], warmup_steps: int):
        self.topo, self.full, self.patches, self.assembly = topo, full, patches, assembly
        self.out_leaves, self.out_spec = out_template  # leaves: OutTensor, or the constant itself
        self.key_inputs = key_inputs
        self.state = StepState(warmup_steps)
        self.store = KVStore()
        self.calls: list[tuple[int, int, bool]] = []  # (step, stream, full) of each call, for tests
        self.timings: list[Timing] = []
        self.layout: Any = None  # stream.PatchLayout, set by the backend when there are patches

    def step_key(self, args: Sequence[Any]) -> tuple | None:
        if not self.key_inputs:
            return None
        return tuple(float(x) for i in self.key_inputs for x in args[i].detach().reshape(-1).tolist())

    def __call__(self, *args: Any) -> Any:
        if current().captures:  # inside ``stream.capture()``: record the flat arguments, run nothing
            return self._capture(args)
        step, stream, full = self.state.on_call(self.step_key(args), current_branch())
        full = full or not self.patches
        self.calls.append((step, stream, full))
        with torch.no_grad(), self.store.current(stream):
            outs = self._run([self.full] if full else self.patches, args, None if full else self.assembly)
        self.state.done(stream, full)
        return outs

    def _capture(self, args: tuple[Any, ...]) -> Any:
        """Record the call's flat arguments; return zeros shaped like the output (nothing runs)."""
        out = [torch.zeros(leaf.shape, dtype=leaf.dtype, device=leaf.device) if isinstance(leaf, OutTensor) else leaf
               for leaf in self.out_leaves]
        current().captures[-1].append((self, args, out))
        return tree_unflatten(out, self.out_spec)

    def _run(self, programs: list[StageProgram], args: Sequence[Any], assembly: Assembly | None) -> Any:
        t = self.topo
        start, compute = time.perf_counter(), 0.0
        device = device_of(args, t.group)  # buffers live where the stage inputs do (CUDA under nccl)
        recvs = [p2p.irecv(p.graph.recv, t.prev, tag=i, device=device) for i, p in enumerate(programs)] \
            if t.prev is not None else []
        sends, results = [], []
        for i, p in enumerate(programs):
            vals = [args[j] for j in p.graph.inputs] + (recvs[i].wait() if recvs else [])
            begin = time.perf_counter()
            out = p.fn(*vals)
            compute += time.perf_counter() - begin
            if t.next is not None:
                sends.append(p2p.isend(list(out), t.next, tag=i))
            else:
                results.append(tree_flatten(out)[0])
        for work in sends:
            if work is not None:
                work.wait()
        final = None
        if t.next is None:
            leaves = assembly(results) if assembly is not None else results[0]
            final = [x for x in leaves if isinstance(x, torch.Tensor)]
        metas = [(leaf.shape, leaf.dtype) for leaf in self.out_leaves if isinstance(leaf, OutTensor)]
        tensors = iter(p2p.broadcast(final, metas, t.last, t.group, device))
        out = [next(tensors) if isinstance(leaf, OutTensor) else leaf for leaf in self.out_leaves]
        kind = "patches" if programs is self.patches else "full"
        self.timings.append(Timing(kind, 1, time.perf_counter() - start, compute))
        return tree_unflatten(out, self.out_spec)


@dataclass(frozen=True)
class OutTensor:
    """A tensor leaf of the graph's output (the other leaves are constants)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


