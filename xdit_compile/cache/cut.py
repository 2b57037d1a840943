"""Where a step cache cuts a graph: after the first transformer block (FBCache) or before it (TeaCache).

Reads: ``node.meta["nn_module_stack"]`` (which repeated module each node runs in: the first
indexed entry of a module path, ``...blocks.0``, names a block, whatever the container is
called), ``node.meta["val"|"example_value"]`` (shapes). Writes:
``node.meta["xdit"]["cache_part"]`` (0, 1 or 2) on every call node; the lowering keeps these
marks on the nodes it rewrites in place, and nodes it inserts take the part of their inputs.

The graph is cut into three parts::

    part 0: prologue + block 0 (FBCache) | prologue + block 0's modulated input (TeaCache)
    part 1: the remaining blocks          (skipped on a cached step)
    part 2: epilogue (final norm, projection, unpatchify)

Blocks are the instances of repeated modules that contain attention (an SDPA, or the matmul /
bmm / einsum of attention spelled out), in graph order: diffusers' own hooks find the same
blocks by container names; here the graph says which nodes each block ran. What the cache
needs, by node name:

* ``pairs``: each value part 1 hands to part 2 (the residual stream(s) after the last block)
  with the value of the same shape that part 0 hands on (the stream(s) after block 0, or
  before it for TeaCache). A skipped step adds the cached difference ``y - x`` to ``x``.
* FBCache's ``base`` / ``probe``: block 0's token-stream input and output; their difference is
  the residual the decision compares across steps (diffusers' ``hidden_states`` residual).
* TeaCache's ``probe``: block 0's first token-sized value that depends on the timestep (the
  normalised input scaled and shifted by the timestep embedding), followed through the
  pointwise ops that finish the modulation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import is_tensor, is_user_input, op_name, value
from ..pipefusion.cuts import token_inputs

PART = "cache_part"
FIRST, REST, LAST = 0, 1, 2
_ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "matmul", "bmm", "baddbmm", "einsum"})
_MODULATION_OPS = frozenset({"add", "mul", "sub", "addcmul", "to", "type_as", "float", "contiguous", "iadd", "imul"})
_INDEXED = re.compile(r"^(.*?)(?:\.(\d+)|\[(\d+)\])$")


@dataclass(frozen=True)
class CacheCut:
    """The cut of one graph (node names; see the module docstring)."""

    method: str  # "fbcache" or "teacache"
    blocks: tuple[str, ...]  # module path of each block, in graph order
    parts: dict[str, int]  # call node name -> part
    pairs: tuple[tuple[str, str], ...]  # (value part 1 makes for part 2, value of part 0 it is cached against)
    probe: str  # FBCache: block 0's output stream; TeaCache: block 0's modulated input
    base: str | None  # FBCache: block 0's input stream

    def describe(self) -> str:
        where = (f"after the first block {_short(self.blocks[0])}" if self.method == "fbcache"
                 else f"before the first block {_short(self.blocks[0])} (decision from {self.probe})")
        return (f"{self.method}: cut {where}; {len(self.blocks) - 1} of {len(self.blocks)} blocks skippable "
                f"(through {_short(self.blocks[-1])}); cached: " + ", ".join(f"{y} - {x}" for y, x in self.pairs))


def _short(path: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].0`` -> ``blocks.0`` (for reports)."""
    path = path.replace("L['self']", "").replace(".__dict__['_modules']", "")
    return re.sub(r"\['([^']*)'\]", r".\1", path).strip(".")


def block_of(node: fx.Node) -> str | None:
    """The outermost indexed module (``...[k]`` / ``....k``) ``node`` runs in, or None."""
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        if _INDEXED.match(path):
            return path
    return None


def _descendants(roots: list[fx.Node]) -> set[fx.Node]:
    seen = set(roots)
    for n in roots[0].graph.nodes if roots else []:
        if n not in seen and any(x in seen for x in n.all_input_nodes):
            seen.add(n)
    return seen


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for x in n.all_input_nodes:
            if x not in seen and x.op != "placeholder":
                seen.add(x)
                stack.append(x)
    return seen


def _live(nodes: list[fx.Node], pos: dict[fx.Node, int], end: int, upto: int) -> list[fx.Node]:
    """Values made at or before position ``upto`` (placeholders included) read after it (or by the output)."""
    out = []
    for n in [p for p in nodes[0].graph.nodes if p.op == "placeholder"] + nodes[:upto + 1]:
        if any(pos.get(u, end) > upto for u in n.users):
            out.append(n)
    return out


def _same(a: fx.Node, b: fx.Node) -> bool:
    va, vb = value(a), value(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype


def _pair(ys: list[fx.Node], xs: list[fx.Node], exclude: set[fx.Node]) -> tuple[list[tuple[str, str]], list[str]]:
    """Each y with the first unused x of its shape and dtype, in graph order; (pairs, unpaired y's as text)."""
    used, pairs, missing = set(exclude), [], []
    for y in ys:
        x = next((x for x in xs if x not in used and _same(x, y)), None)
        if x is None:
            v = value(y)
            missing.append(f"{y.name} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            continue
        used.add(x)
        pairs.append((y.name, x.name))
    return pairs, missing


def _step_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Small user tensor inputs (timestep, guidance): ``numel <= batch``."""
    users = [n for n in gm.graph.nodes if n.op == "placeholder" and is_tensor(n) and is_user_input(n)]
    if not users:
        return []
    big = value(max(users, key=lambda n: value(n).numel()))
    b = big.shape[0] if big.dim() else 1
    return [n for n in users if value(n).dim() <= 1 and value(n).numel() <= b]


def find_cache_cut(gm: fx.GraphModule, method: str) -> CacheCut | str:
    """The cut of ``gm`` for ``method`` ("fbcache" / "teacache"), or why it has none (text)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    pos = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    members: dict[str, list[int]] = {}
    for n in nodes:
        b = block_of(n)
        if b is not None:
            members.setdefault(b, []).append(pos[n])
    blocks = [b for b in members if any(op_name(nodes[i]) in _ATTENTION_OPS for i in members[b])]
    if len(blocks) < 2:
        return (f"{len(blocks)} transformer block(s) found (repeated modules holding attention): nothing to skip "
                "after the first")
    first, second, last = members[blocks[0]], members[blocks[1]], members[blocks[-1]]
    s0, e0, e_last = min(first), max(first), max(last)
    if e0 >= min(second):
        return f"the first two blocks ({_short(blocks[0])}, {_short(blocks[1])}) interleave in the graph"
    tokens = token_inputs(gm)
    if not tokens:
        return "no user tensor input carries the tokens"
    tok = _descendants(tokens)
    x0s = [n for n in _live(nodes, pos, end, s0 - 1) if n in tok and is_tensor(n)]
    if not x0s:
        return f"no token-carrying value enters the first block {_short(blocks[0])}"
    x0 = max(x0s, key=lambda n: value(n).numel())
    parts: dict[str, int] = {}
    if method == "fbcache":
        for n in nodes:
            parts[n.name] = FIRST if pos[n] <= e0 else REST if pos[n] <= e_last else LAST
        xs = [n for n in _live(nodes, pos, end, e0) if is_tensor(n)]
        probe = next((x for x in xs if x in tok and _same(x, x0) and x is not x0), None)
        if probe is None:
            return f"the first block {_short(blocks[0])} hands on no value shaped like its input {x0.name}"
        base: str | None = x0.name
    else:
        steps = _step_inputs(gm)
        if not steps:
            return "TeaCache needs a timestep input (a user tensor of at most batch elements); none found"
        timed = _descendants(steps)
        m = next((nodes[i] for i in first if nodes[i] in tok and nodes[i] in timed and _same(nodes[i], x0)), None)
        if m is None:
            return (f"no value of the first block {_short(blocks[0])} shaped like its input {x0.name} depends on "
                    "the timestep (no timestep-modulated input to decide from): use use_fbcache")
        while len(m.users) == 1:
            (u,) = m.users
            if op_name(u) not in _MODULATION_OPS or not _same(u, m):
                break
            m = u
        head = _ancestors(m) | {m}
        for n in nodes:
            parts[n.name] = FIRST if pos[n] < s0 or n in head else REST if pos[n] <= e_last else LAST
        xs = [n for n in _live(nodes, pos, end, s0 - 1) if is_tensor(n)]
        probe, base = m, None
    rest = [n for n in nodes if parts[n.name] == REST]
    last_part = {n for n in nodes if parts[n.name] == LAST} | {next(n for n in gm.graph.nodes if n.op == "output")}
    ys = [n for n in rest if any(u in last_part for u in n.users)]
    if not ys:
        return "the blocks hand nothing to the epilogue"
    made_first = {n for n in nodes if parts[n.name] == FIRST} | {p for p in gm.graph.nodes if p.op == "placeholder"}
    pairs, missing = _pair(ys, [x for x in xs if x in made_first], {probe} if method == "teacache" else set())
    if missing:
        return (f"the blocks hand {', '.join(missing)} to the epilogue, and nothing of that shape enters "
                f"{'block 1' if method == 'fbcache' else 'block 0'} to cache it against")
    for n in nodes:
        n.meta.setdefault("xdit", {})[PART] = parts[n.name]
    return CacheCut(method, tuple(blocks), parts, tuple(pairs), probe.name, base)
