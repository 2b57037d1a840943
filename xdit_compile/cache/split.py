"""Cut a (lowered) graph into the step cache's three programs.

Reads: ``node.meta["xdit"]["cache_part"]`` (``cut.py``) on the nodes it marked; nodes a rewrite
inserted later (slices, collectives of the lowering) take the part of their inputs, or with
none, of their first user; a getitem stays with the tuple it reads. Writes: new
``GraphModule`` s; ``gm`` is left unchanged.

Part ``k`` takes the caller's inputs it reads (by flat index) plus, by node name, the values
earlier parts made that it reads; it returns, by name, the values later parts (or the output)
read, plus the ``probes`` it makes (values the cache itself reads). The last part returns the
graph's output. Non-tensor values are inlined as constants (shapes are static). Chained in
order, the parts compute what the graph computes::

    args -> [part 0] -{x, h1, temb}-> [part 1: blocks 1..N-1] -{y}-> [part 2: epilogue] -> out
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..errors import PlanError
from ..graph import complete_marks, op_name, value
from ..pipefusion.split import _constant
from .cut import PART

PARTS = 3


@dataclass
class Part:
    """One program of the cut and the names of what flows in and out of it."""

    gm: fx.GraphModule
    inputs: list[int]  # indices into the caller's flat args, in placeholder order
    recv: list[str]  # names of values of earlier parts, after the inputs
    send: list[str]  # names of the values it returns (empty for the last part: it returns the output)

    def example_inputs(self, args: list[Any]) -> list[Any]:
        """The caller's inputs and zeros shaped like the received values (to compile the program)."""
        phs = [n for n in self.gm.graph.nodes if n.op == "placeholder"][len(self.inputs):]
        return [args[i] for i in self.inputs] + [
            torch.zeros(value(p).shape, dtype=value(p).dtype, device=value(p).device) for p in phs]


def part_of(node: fx.Node) -> int | None:
    return node.meta.get("xdit", {}).get(PART)


def assign_parts(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Every call node's part (marks, completed for inserted nodes); raises when a node reads a later part."""
    part, broken = complete_marks(gm, part_of)
    if broken is not None:
        n, x = broken
        raise PlanError(f"step cache: {n.name} ({op_name(n)}, part {part[n]}) reads {x.name} (part {part[x]}) "
                        "of a later part: the graph cannot be cut after its first block; compile without "
                        "use_fbcache / use_teacache")
    return part


def split_parts(gm: fx.GraphModule, probes: set[str]) -> list[Part]:
    """The three programs of ``gm``; ``probes``: names of part-0 values to return as well."""
    part = assign_parts(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {p: i for i, p in enumerate(placeholders)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    calls = [n for n in gm.graph.nodes if n in part]
    last = PARTS - 1

    def readers(n: fx.Node) -> list[int]:
        return [last if u.op == "output" else part[u] for u in n.users]

    def crossing(k: int) -> list[fx.Node]:
        """Tensor values made in part k, read by a later part (or the output), or probed."""
        return [n for n in calls if part[n] == k and isinstance(value(n), torch.Tensor)
                and (any(r > k for r in readers(n)) or n.name in probes)]

    result = []
    for k in range(PARTS):
        g = fx.Graph()
        env: dict[fx.Node, Any] = {}
        mine = [n for n in calls if part[n] == k]
        reading = mine + ([out_node] if k == last else [])
        used_ph = sorted({x for n in reading for x in n.all_input_nodes if x.op == "placeholder"}, key=index.get)
        for p in used_ph:
            env[p] = g.placeholder(p.name)
            env[p].meta = dict(p.meta)
        incoming = [n for n in calls if part[n] < k and isinstance(value(n), torch.Tensor)
                    and any(x is n for r in reading for x in r.all_input_nodes)]
        for n in incoming:
            env[n] = g.placeholder(f"in_{n.name}")
            env[n].meta = dict(n.meta)

        def lookup(x: fx.Node) -> Any:
            if x in env:
                return env[x]
            return _constant(value(x))  # a non-tensor of an earlier part: a constant here

        for n in mine:
            env[n] = g.node_copy(n, lookup)
        outgoing = crossing(k) if k < last else []
        if k == last:
            g.output(map_arg(out_node.args[0], lookup))
        else:
            g.output(tuple(env[n] for n in outgoing))
        g.lint()
        result.append(Part(fx.GraphModule(gm, g), [index[p] for p in used_ph], [n.name for n in incoming],
                           [n.name for n in outgoing]))
    return result
