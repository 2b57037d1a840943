"""Give a buffer filled in place a fresh node once its last write is done, so it can be sharded.

Models pack tokens into a fresh buffer with per-sample writes, then run their blocks on it:

    buf = new_zeros(B, T+I, D)                 buf = new_zeros(B, T+I, D)
    buf[0, :8] = txt0; buf[0, 8:] = img0   ->  buf[0, :8] = txt0; buf[0, 8:] = img0
    h = norm(buf); y = buf + attn(h)           done = clone(buf)
                                               h = norm(done); y = done + attn(h)

A redistribution of ``buf`` (a free slice to shard it) would be inserted right after ``buf`` is
made, before the writes, so every plan that shards the blocks reading ``buf`` is refused.
``done`` is made after the last write and is never written: the seed search may shard it
(``activation_seeds``), and its slice sees every write. The clone is one copy of the buffer.

Reads: the graph (in-place writes by ``graph.written_inputs``, views by ``_MAY_ALIAS``).
Writes: the graph (one ``clone`` per member of a written alias group that is read after the
group's last write, marked ``meta["xdit_settled"]``; those reads are rewired to it; the graph's
outputs are left alone).

The clone is needed only while planning (a node of its own to seed or redistribute after the
writes). ``unsettle`` removes it from the lowered program: nothing writes the group after it,
so reading the buffer itself is the same, and no copy is left to pay for.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import is_tensor, written_inputs
from .activation_seeds import _alias_roots


def settle_writes(gm: fx.GraphModule) -> int:
    """Insert the clones (see the module docstring); returns how many."""
    nodes = list(gm.graph.nodes)
    pos = {x: i for i, x in enumerate(nodes)}
    roots = _alias_roots(nodes)
    last: dict[fx.Node, fx.Node] = {}
    for w in nodes:
        for t in written_inputs(w):
            last[roots[t]] = w
    added = 0
    for member in nodes:
        w = last.get(roots.get(member))
        if w is None or member.op == "output" or not is_tensor(member) or pos[member] > pos[w]:
            continue
        late = [u for u in member.users if pos.get(u, -1) > pos[w] and u.op != "output" and not written_inputs(u)]
        if not late:
            continue
        with gm.graph.inserting_after(w):
            done = gm.graph.call_method("clone", (member,))
        done.meta["example_value"] = done.meta["val"] = member.meta.get("val", member.meta.get("example_value"))
        done.meta["xdit_settled"] = True
        for u in late:
            u.replace_input_with(member, done)
        added += 1
    if added:
        gm.recompile()
    return added


def unsettle(gm: fx.GraphModule) -> int:
    """Replace every clone ``settle_writes`` made by the buffer it copied; returns how many.

    Reads: ``node.meta["xdit_settled"]``. Writes: the graph (those clones removed).
    """
    removed = 0
    for node in list(gm.graph.nodes):
        if node.meta.get("xdit_settled") and node.op == "call_method" and node.target == "clone":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()
    return removed
