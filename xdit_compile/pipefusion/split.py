"""Stage mechanism: cut one graph into per-stage graphs, given each node's stage.

Reads: ``node.meta["xdit"]["pf_stage"]`` on the nodes the policy placed (the original call
nodes); nodes a rewrite inserted later take the stage of their inputs (or, with none, of
their first user). Writes: new ``GraphModule`` s; the input graph is left unchanged.

Stage ``s`` takes the caller's inputs it reads (by flat index) plus the *boundary* values
from stage ``s - 1`` (made before ``s``, used at ``s`` or later, relayed when used further
on), and returns the boundary values for ``s + 1``; the last stage returns the graph's
output. Only tensors cross a boundary: a getitem stays with the tuple it reads, and
non-tensor values (sizes) are inlined as constants. Chained in order, the stages compute
exactly what the graph computes (``tests/pipefusion/test_stage_split.py`` checks this)::

    x, w0, w1 -> [stage 0: h = block0(x, w0)] -h-> [stage 1: y = block1(h, w1)] -> y
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..errors import PlanError
from ..graph import complete_marks, value
from ..runtime.devices import device_of

STAGE = "pf_stage"


@dataclass
class StageGraph:
    """One stage's program and what flows in and out of it."""

    gm: fx.GraphModule
    inputs: list[int]  # indices into the caller's flat args, in placeholder order
    recv: list[tuple[tuple[int, ...], torch.dtype]]  # boundary values received, in order
    send: list[tuple[tuple[int, ...], torch.dtype]]  # boundary values sent (empty for the last stage)
    recv_names: list[str]
    send_names: list[str]

    def example_inputs(self, flat_args: list[Any]) -> list[Any]:
        # The received boundary values live where the stage's own inputs do (CUDA under nccl).
        device = device_of(flat_args)
        return [flat_args[i] for i in self.inputs] + [torch.zeros(s, dtype=d, device=device) for s, d in self.recv]


def stage_of(node: fx.Node) -> int | None:
    return node.meta.get("xdit", {}).get(STAGE)


def assign_stages(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Every call node's stage (policy marks, completed for inserted nodes); checks order."""
    st, broken = complete_marks(gm, stage_of)
    if broken is not None:
        n, x = broken
        raise PlanError(f"internal: stage order broken at {n.name} (stage {st[n]}) reading {x.name} (stage {st[x]})")
    return st


def _constant(v: Any) -> Any:
    if isinstance(v, torch.Size):
        return tuple(int(i) for i in v)
    if isinstance(v, (tuple, list)) and all(isinstance(i, (int, float, bool)) for i in v):
        return type(v)(v)
    if v is None or isinstance(v, (int, float, bool, torch.dtype, torch.device, str)):
        return v
    raise PlanError(f"a value of type {type(v).__name__} would cross a pipeline stage boundary; "
                    "pipefusion needs static shapes (compile with dynamic=False)")


def _meta(node: fx.Node) -> tuple[tuple[int, ...], torch.dtype]:
    v = value(node)
    return tuple(int(s) for s in v.shape), v.dtype


def split_stages(gm: fx.GraphModule, stages: int) -> list[StageGraph]:
    """The ``stages`` per-stage programs of ``gm``; see the module docstring."""
    st = assign_stages(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {p: i for i, p in enumerate(placeholders)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    calls = [n for n in gm.graph.nodes if n in st]
    last = stages - 1

    def used_at(n: fx.Node) -> list[int]:
        return [last if u.op == "output" else st[u] for u in n.users]

    def boundary(s: int) -> list[fx.Node]:
        """Tensor values made before stage s and used at s or later."""
        return [n for n in calls if st[n] < s and isinstance(value(n), torch.Tensor) and any(t >= s for t in used_at(n))]

    result = []
    for s in range(stages):
        g = fx.Graph()
        env: dict[fx.Node, Any] = {}
        mine = [n for n in calls if st[n] == s]
        readers = mine + ([out_node] if s == last else [])
        used_ph = sorted({x for n in readers for x in n.all_input_nodes if x.op == "placeholder"}, key=index.get)
        for p in used_ph:
            env[p] = g.placeholder(p.name)
            env[p].meta = dict(p.meta)
        incoming = boundary(s)
        for n in incoming:
            env[n] = g.placeholder(f"recv_{n.name}")
            env[n].meta = dict(n.meta)

        def lookup(x: fx.Node) -> Any:
            if x in env:
                return env[x]
            return _constant(value(x))  # a non-tensor made in an earlier stage: a constant here

        for n in mine:
            env[n] = g.node_copy(n, lookup)
        outgoing = boundary(s + 1) if s < last else []
        if s == last:
            g.output(map_arg(out_node.args[0], lookup))
        else:
            g.output(tuple(env[n] for n in outgoing))
        g.lint()
        result.append(StageGraph(
            fx.GraphModule(gm, g), [index[p] for p in used_ph], [_meta(n) for n in incoming],
            [_meta(n) for n in outgoing], [n.name for n in incoming], [n.name for n in outgoing]))
    return result


def mark_stages(gm: fx.GraphModule, nodes: list[fx.Node], positions: list[int], chosen: list[int]) -> None:
    """Policy result onto the graph: nodes[: positions[c0] + 1] -> stage 0, and so on."""
    cut_after = [positions[c] for c in chosen]
    s = 0
    for i, n in enumerate(nodes):
        n.meta.setdefault("xdit", {})[STAGE] = s
        while s < len(cut_after) and i == cut_after[s]:
            s += 1
