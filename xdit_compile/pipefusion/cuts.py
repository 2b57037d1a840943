"""Where a graph may be cut into pipeline stages: the gaps between transformer blocks.

Reads: ``node.meta["val"|"example_value"]`` (shapes, dtypes). Writes: nothing.

A cut after node ``t`` (in the graph's topological order) moves every value made at or
before ``t`` and used after it (its *live set*) from one stage to the next. Between two
attention layers, the live set is smallest where only the residual stream crosses: that is
the boundary of a transformer block, found without knowing any model class::

    ... attn_k ... h = h + ff(norm(h))  |  x = norm(h) ... attn_k+1 ...
                                        ^ live: h (tokens) + temb, text (not token-sized)

``find_cuts`` measures, for every position, the bytes of live values that depend on the
token input (the largest user input), takes in each interval between consecutive
attention nodes the position with the fewest token bytes (then fewest bytes in all, then
the latest, so that a block's last op stays with the block), and keeps the intervals whose
minimum is residual-sized (within ``slack`` of the smallest). Between two kept cuts lies a
*unit*; its cost is the estimated flops of its nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import is_tensor, is_user_input, op_name, value
from ..passes.propagate import estimate_flops


@dataclass(frozen=True)
class Cuts:
    """Candidate cut positions (indices into ``nodes``) and the cost of the units between them."""

    nodes: list[fx.Node]  # every call node, in graph order (placeholders and output excluded)
    positions: list[int]  # cut after nodes[p]; sorted
    unit_costs: list[float]  # len(positions) + 1
    attention_layers: int
    live_bytes: list[int]  # bytes crossing each candidate cut (all live values)
    blocks: tuple[int, int] = (0, -1)  # first and last node position of the blocks (after the
    # prologue: patch embedding, time/text embeddings; before the epilogue: final norm, projection)

    def describe(self) -> str:
        return (f"{self.attention_layers} attention layers, {len(self.positions)} cut points, "
                f"unit costs {[f'{c:.3g}' for c in self.unit_costs]}")


def _nbytes(node: fx.Node) -> int:
    v = value(node)
    if isinstance(v, torch.Tensor):
        return int(v.numel() * v.element_size())
    if isinstance(v, (tuple, list)):
        return sum(int(t.numel() * t.element_size()) for t in v if isinstance(t, torch.Tensor))
    return 0


def token_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The user input(s) carrying the tokens: the largest by element count."""
    users = [n for n in gm.graph.nodes if n.op == "placeholder" and is_tensor(n) and is_user_input(n)]
    if not users:
        return []
    biggest = max(value(n).numel() for n in users)
    return [n for n in users if value(n).numel() == biggest]


def is_attention(node: fx.Node) -> bool:
    return op_name(node) == "scaled_dot_product_attention"


def find_cuts(gm: fx.GraphModule, slack: float = 1.5) -> Cuts:
    """Cut candidates between attention layers; see the module docstring."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    pos = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    tokens = set(token_inputs(gm))
    for n in gm.graph.nodes:
        if n.op != "placeholder" and any(x in tokens for x in n.all_input_nodes):
            tokens.add(n)
    # Difference arrays: a value made at p and last used at u is live for cuts p .. u-1.
    diff_all = [0] * (end + 1)
    diff_tok = [0] * (end + 1)
    for n in nodes:
        last = max((pos.get(u, end) for u in n.users), default=pos[n])
        if last <= pos[n]:
            continue
        b = _nbytes(n)
        diff_all[pos[n]] += b
        diff_all[last] -= b
        if n in tokens:
            diff_tok[pos[n]] += b
            diff_tok[last] -= b
    live_all, live_tok, a, t = [], [], 0, 0
    for i in range(end):
        a += diff_all[i]
        t += diff_tok[i]
        live_all.append(a)
        live_tok.append(t)
    attn = [pos[n] for n in nodes if is_attention(n)]
    best: list[tuple[int, int, int]] = []  # (token bytes, all bytes, position)
    for lo, hi in zip(attn, attn[1:]):
        pick = min(range(lo, hi), key=lambda i: (live_tok[i], live_all[i], -i))
        best.append((live_tok[pick], live_all[pick], pick))
    floor = min((b[0] for b in best), default=0)
    positions = [p for tok, _, p in best if tok <= slack * floor]
    flops = [estimate_flops(n, op_name(n)) if is_tensor(n) or isinstance(value(n), (tuple, list)) else 0.0 for n in nodes]
    bounds = [-1, *positions, end - 1]
    costs = [float(sum(flops[lo + 1:hi + 1])) for lo, hi in zip(bounds, bounds[1:])]
    blocks = (0, -1)
    first_tok = min((pos[n] for n in tokens if n in pos), default=0)
    if attn:
        # The blocks start after the last residual-sized point before the first attention
        # and end where the final run of residual-sized points (the epilogue) begins.
        floor = floor if best else min(live_tok[first_tok:attn[0]] or [0])
        small = [i for i in range(end) if live_tok[i] <= slack * floor]
        start = max((i for i in small if first_tok <= i < attn[0]), default=attn[0] - 1)
        # the epilogue is the final run of residual-sized positions (norm, projection, unpatchify)
        small_set, stop = set(small), end - 1
        while stop - 1 > attn[-1] and stop - 1 in small_set:
            stop -= 1
        blocks = (start + 1, stop)
    return Cuts(nodes, positions, costs, len(attn), [live_all[p] for p in positions], blocks)
