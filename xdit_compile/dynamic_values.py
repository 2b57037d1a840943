"""Compile a graph with data-dependent sizes once per run-time value, so it stays parallel.

With ``torch._dynamo.config.capture_dynamic_output_shape_ops`` / ``capture_scalar_outputs``
Dynamo keeps ``nonzero``, ``item``, ``tolist``, boolean indexing ... in the graph; their sizes
are *unbacked* ``SymInt``s (``u0``), which the passes cannot shard. ``PerValue`` splits such a
graph at the nodes that define unbacked symbols (the *value nodes*):

    prefix   the value nodes and what they read (normally a few mask ops); runs eagerly, on
             every rank, on the call's arguments, and yields the concrete values
    program  the whole graph with each value node replaced: a tensor (``nonzero``'s indices) by a
             new trailing input fed with the prefix's result, a scalar (``item``) by its literal;
             then specialised to static sizes (``specialize.specialise``) and handed to the static
             backend (passes, lowering, inner compiler)::

    m: b8[8]                                     m: b8[8], idx: i64[5, 1]   (idx: the prefix's nonzero)
    idx = torch.nonzero(m)         # [u0, 1]  ->
    t = text[:, idx[:, 0]]         # [1, u0, C]  t = text[:, idx[:, 0]]         # [1, 5, C]
    n = m.sum().item()             # u1          (n folded: 5)

Programs are cached by the values' *signature* (a tensor's shape, a scalar's value): a new mask
with as many valid tokens reuses the program; at most ``CACHE_SIZE`` programs, least recently used
out. The first program is compiled for the example inputs when the backend is called.

Ranks agree on the values: they are computed from the call's arguments and the weights, which
``guard.Guarded`` checks are equal on every rank before each call, so every rank misses the cache
together. Each miss (and, with ``check_inputs=False``, each call) all-gathers one int64 digest of
the signature and raises ``RankMismatchError`` when ranks differ, instead of compiling different
programs that would post collectives of different sizes (a hang or an abort).

Before the split, boolean-mask selections (``x[m]``, ``masked_select``) become indexing by the
mask's ``nonzero`` positions (``index_by_positions``), so the prefix reads the mask, not ``x``.
Only unbacked *integer* symbols make value nodes: a float ``.item()`` (a factor) stays in the
program. A graph is not split (``Refused``; it runs through the passes with its unbacked sizes
replicated, as before) when its prefix would write a caller's tensor or draw random numbers (it
runs twice per call), or when a value node's result is data rather than positions or sizes (taken
out of the program, what it reads would run replicated and lose its gradient). A prefix with
matmuls, convolutions or attention is split, with a WARNING (log and report): it runs replicated.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._sympy.symbol import SymT, symbol_is_type

from .errors import RankMismatchError
from .gradients import needs_guard
from .graph import eliminate_dead_code, has_side_effects, is_tensor, op_name, value, written_inputs
from .passes.refresh_meta import refresh_meta
from .runtime.devices import collective_device

log = logging.getLogger("xdit_compile")

CACHE_SIZE = 8
Signature = tuple[Any, ...]

# Ops whose results alias their first argument: a write through them writes that argument.
_VIEWS = frozenset({"view", "reshape", "getitem", "transpose", "permute", "unsqueeze", "squeeze", "flatten",
                    "unflatten", "expand", "narrow", "select", "slice", "as_strided", "view_as", "t", "movedim",
                    "split", "chunk", "unbind", "contiguous", "detach", "diagonal", "real", "imag"})
# Ops that make a prefix expensive (it runs replicated, before the program and again inside it).
_HEAVY = frozenset({"linear", "matmul", "bmm", "mm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d",
                    "conv_transpose2d", "scaled_dot_product_attention", "multi_head_attention_forward"})
_RANDOM = frozenset({"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli",
                     "multinomial", "normal", "dropout", "randperm", "uniform_", "normal_", "bernoulli_"})


class Refused(Exception):
    """The graph cannot be split at its value nodes (the message says why)."""


def _unbacked(v: Any) -> set:
    """The unbacked *integer* symbols in ``v``: sizes known only at run time. Unbacked floats
    (``x.max().item()`` used as a factor) size nothing; they stay in the graph as they are."""
    if isinstance(v, (list, tuple)):
        return set().union(*(_unbacked(x) for x in v)) if v else set()
    if isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return {s for s in free_unbacked_symbols(v) if symbol_is_type(s, SymT.UNBACKED_INT)}
    return set()


def value_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that define unbacked symbols: their result's sizes (or value) depend on data.

    Reads ``node.meta["val"]`` / ``["example_value"]``: a node defines a symbol that none of
    its inputs' values carries (``nonzero`` defines ``u0``; ``idx.size(0)`` only reads it).
    """
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        mine = _unbacked(value(node))
        if not mine:
            continue
        seen = set().union(*(_unbacked(value(x)) for x in node.all_input_nodes)) if node.all_input_nodes else set()
        if mine - seen:
            out.append(node)
    return out


def _is_bool(x: Any) -> bool:
    v = value(x)
    return isinstance(x, fx.Node) and isinstance(v, torch.Tensor) and v.dtype == torch.bool


def index_by_positions(gm: fx.GraphModule) -> bool:
    """Rewrite boolean-mask selections into indexing by the mask's ``nonzero`` positions (in place).

    ``x[..., m]`` and ``torch.masked_select(x, m)`` make a value node whose result is data (the
    selected elements): computed before the program, everything ``x`` reads would run replicated.
    Their ``nonzero(m, as_tuple=True)`` positions depend on the mask alone::

        y = x[:, m]                  ->   p = torch.nonzero(m, as_tuple=True); y = x[:, p[0], p[1]]
        y = torch.masked_select(x, m) ->  x.expand(shape)[nonzero(m.expand(shape), as_tuple=True)]

    Writes no meta (the caller refreshes it). Returns whether anything changed.
    """
    changed = False
    for node in list(gm.graph.nodes):
        name = op_name(node)
        if name == "masked_select" and len(node.args) == 2 and all(is_tensor(a) for a in node.args):
            x, m = node.args
            sizes = (*value(x).shape, *value(m).shape)
            if not all(isinstance(d, int) for d in sizes):
                continue
            # Each expanded to the broadcast shape on its own: the positions must not read x.
            full = tuple(torch.broadcast_shapes(value(x).shape, value(m).shape))
            with gm.graph.inserting_before(node):
                xb = gm.graph.call_method("expand", (x, full))
                mb = gm.graph.call_method("expand", (m, full))
                pos = gm.graph.call_function(torch.nonzero, (mb,), {"as_tuple": True})
                idx = tuple(gm.graph.call_function(operator.getitem, (pos, i)) for i in range(len(full)))
                new = gm.graph.call_function(operator.getitem, (xb, idx))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
        elif name == "getitem" and len(node.args) == 2 and isinstance(value(node.args[0]), torch.Tensor):
            x, index = node.args
            items = index if isinstance(index, tuple) else (index,)
            masks = [i for i, it in enumerate(items) if _is_bool(it)]
            if len(masks) != 1 or any(it is Ellipsis for it in items[:masks[0]]):
                continue  # one mask, placed by position (an Ellipsis before it would move it)
            p = masks[0]
            m = items[p]
            with gm.graph.inserting_before(node):
                pos = gm.graph.call_function(torch.nonzero, (m,), {"as_tuple": True})
                idx = tuple(gm.graph.call_function(operator.getitem, (pos, i)) for i in range(value(m).dim()))
                new = gm.graph.call_function(operator.getitem, (x, (*items[:p], *idx, *items[p + 1:])))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
    if changed:
        eliminate_dead_code(gm.graph)
        gm.recompile()
    return changed


def _base(node: Any) -> Any:
    while isinstance(node, fx.Node) and op_name(node) in _VIEWS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def prefix_nodes(gm: fx.GraphModule, values: Sequence[fx.Node]) -> list[fx.Node]:
    """What must run to compute ``values``: their ancestors, and earlier writes into those.

    Raises ``Refused`` when the prefix would write a graph input or draw random numbers.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(order[v] for v in values)
    keep: set[fx.Node] = set()

    def add(node: fx.Node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            if n not in keep:
                keep.add(n)
                stack.extend(n.all_input_nodes)

    for v in values:
        add(v)
    writers = [n for n in gm.graph.nodes if order[n] < last and has_side_effects(n)]
    changed = True
    while changed:  # a write into a tensor the prefix reads (directly or through a view) is part of it
        changed = False
        bases = {_base(n) for n in keep}
        for w in writers:
            if w not in keep and any(_base(t) in bases for t in written_inputs(w)):
                add(w)
                changed = True
    for n in keep:
        if n.op == "placeholder":
            continue
        hit = [t for t in written_inputs(n) if _base(t).op == "placeholder"]
        if hit:
            raise Refused(f"{n.name} ({op_name(n)}) writes input {_base(hit[0]).name} before the data-dependent "
                          "value is known, and the split would run it twice")
        if op_name(n) in _RANDOM:
            raise Refused(f"{n.name} ({op_name(n)}) draws random numbers before the data-dependent value is known")
    return [n for n in gm.graph.nodes if n in keep]


def _prefix_module(gm: fx.GraphModule, nodes: list[fx.Node], values: list[fx.Node]) -> fx.GraphModule:
    """A module taking ``gm``'s arguments and returning the values (a tuple)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
    for n in nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[v] for v in values))
    return fx.GraphModule(gm, graph)


def _tensors(results: Sequence[Any]) -> list[torch.Tensor]:
    """The tensors among ``results`` (one level of tuples opened), in the order ``substitute`` adds inputs."""
    out: list[torch.Tensor] = []
    for r in results:
        if isinstance(r, torch.Tensor):
            out.append(r)
        elif isinstance(r, (tuple, list)):
            out.extend(x for x in r if isinstance(x, torch.Tensor))
    return out


def _python(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_python(v) for v in x)
    return x


def signature(results: Sequence[Any]) -> Signature:
    """What a program is specialised to: a tensor's shape and dtype, a scalar's value."""
    out: list[Any] = []
    for r in results:
        if isinstance(r, torch.Tensor):
            out.append((tuple(r.shape), str(r.dtype)))
        elif isinstance(r, (list, tuple)):
            out.append(tuple(signature(r)))
        else:
            out.append(r)
    return tuple(out)


def _label(text: str) -> SimpleNamespace:
    """Stands in for Dynamo's ``grapharg`` on an input the split adds: labels it, marks it not the caller's."""
    return SimpleNamespace(source=SimpleNamespace(name=text))


def substitute(gm: fx.GraphModule, values: list[fx.Node], results: Sequence[Any]) -> fx.GraphModule:
    """A copy of ``gm``: tensor values become new trailing inputs, scalars their literals.

    Writes, on the copy: new placeholders ``xdit_value_<node>`` (``meta["grapharg"]`` labels them
    ``value of <node> (<op>)``; not user inputs); dead prefix nodes are erased.
    """
    from .specialize import _copy

    new = _copy(gm)
    mapping = dict(zip(gm.graph.nodes, new.graph.nodes))
    last_ph = [n for n in new.graph.nodes if n.op == "placeholder"][-1]

    def placeholder(node: fx.Node, suffix: str) -> fx.Node:
        nonlocal last_ph
        with new.graph.inserting_after(last_ph):
            ph = new.graph.placeholder(f"xdit_value_{node.name}{suffix}")
        ph.meta["grapharg"] = _label(f"value of {node.name}{suffix} ({op_name(node)})")
        last_ph = ph
        return ph

    for v, r in zip(values, results):
        node = mapping[v]
        if isinstance(r, torch.Tensor):
            node.replace_all_uses_with(placeholder(node, ""))
        elif isinstance(r, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in r):
            # nonzero(as_tuple=True): each element read by getitem becomes its own input.
            users = list(node.users)
            if not all(op_name(u) == "getitem" and isinstance(u.args[1], int) for u in users):
                raise Refused(f"{node.name} ({op_name(node)}) returns tensors read other than by index")
            phs = [placeholder(node, f"_{i}") if isinstance(x, torch.Tensor) else x for i, x in enumerate(r)]
            for u in users:
                u.replace_all_uses_with(phs[u.args[1]])
                new.graph.erase_node(u)
        else:
            node.replace_all_uses_with(_python(r))  # type: ignore[arg-type]
    eliminate_dead_code(new.graph)
    new.recompile()
    return new


def _digest(sig: Signature) -> int:
    return int.from_bytes(hashlib.sha256(repr(sig).encode()).digest()[:7], "little")


class PerValue:
    """The callable the backend returns for a graph with data-dependent sizes (see module docstring).

    ``compile_static(graph, example_inputs)`` is the static backend (without rank agreement:
    the caller checks inputs); ``check`` all-gathers each call's signature digest (for
    ``check_inputs=False``, where nothing else makes sure ranks compute equal values).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 compile_static: Callable[[fx.GraphModule, list[Any]], Callable], check: bool = False,
                 cache_size: int = CACHE_SIZE, name: str = "graph"):
        from .specialize import _copy

        self.gm = _copy(gm)  # keeps the placeholders' grapharg meta, which Dynamo drops later
        if index_by_positions(self.gm):
            refresh_meta(self.gm, example_inputs)
        self.values = value_nodes(self.gm)
        self.traced_for_autograd = needs_guard(example_inputs)
        self.nodes = prefix_nodes(self.gm, self.values)
        self.prefix = _prefix_module(self.gm, self.nodes, self.values)
        heavy = [f"{n.name} ({op_name(n)})" for n in self.nodes if op_name(n) in _HEAVY]
        self.warning = (f"the data-dependent values ({', '.join(v.name for v in self.values)}) are computed from "
                        f"{', '.join(heavy[:4])}{' ...' if len(heavy) > 4 else ''}: that part runs before the "
                        "program, replicated on every rank, and again inside it") if heavy else None
        self.compile_static = compile_static
        self.check, self.cache_size, self.name = check, cache_size, name
        self.cache: OrderedDict[Signature, Callable] = OrderedDict()
        self.compiled = 0  # programs compiled so far (evicted ones compile again)
        self._program(list(example_inputs))  # the first program now, for the example's values
        if self.warning:
            log.warning("xdit: %s: %s", name, self.warning)

    def describe(self, results: Sequence[Any]) -> str:
        parts = []
        for v, r in zip(self.values, results):
            what = (f"shape {tuple(r.shape)}" if isinstance(r, torch.Tensor) else
                    f"shapes {[tuple(x.shape) for x in r]}" if _tensors([r]) else repr(r))
            op = op_name(v)
            parts.append(f"{v.name}{'' if v.name.startswith(str(op)) else f' ({op})'} = {what}")
        return ", ".join(parts)

    def _program(self, args: list[Any]) -> tuple[Callable, list[torch.Tensor]]:
        with torch.no_grad():
            results = list(self.prefix(*args))
        results = [r if isinstance(r, torch.Tensor) else _python(r) for r in results]
        data = [v.name for v, r in zip(self.values, results) for t in _tensors([r])
                if t.is_floating_point() or t.is_complex()]
        if data:
            raise Refused(f"{', '.join(data)} computes data (not positions or sizes) whose size depends on data: "
                          "taken out of the program, what it reads would run replicated"
                          + (" and its gradient would be lost" if self.traced_for_autograd else ""))
        key = signature(results)
        fn = self.cache.get(key)
        if self.check or fn is None:  # every rank misses together when inputs agree (see module docstring)
            self._agree(key, results)
        extras = _tensors(results)
        if fn is not None:
            self.cache.move_to_end(key)
            return fn, extras
        what = self.describe(results)
        if len(self.cache) >= self.cache_size:
            self.cache.popitem(last=False)
            log.warning("xdit: more than %d data-dependent value sets of %s (new: %s); dropped the least recently "
                        "used, which compiles again if it comes back", self.cache_size, self.name, what)
        log.info("xdit: %s has data-dependent sizes: compiling a static program for %s (%d cached)",
                 self.name, what, len(self.cache))
        from .report import reports
        from .specialize import specialise

        before = len(reports())
        static = specialise(substitute(self.gm, self.values, results), [*args, *extras])
        fn = self.compile_static(static, [*args, *extras])
        for report in reports()[before:]:
            report.graph += f" [data-dependent values: {what}]"
            if self.warning:
                report.warnings.append(self.warning)
        self.cache[key] = fn
        self.compiled += 1
        return fn, extras

    def _agree(self, key: Signature, results: Sequence[Any]) -> None:
        """All-gather the signature's digest; ``RankMismatchError`` on every rank when ranks differ."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        mine = torch.tensor([_digest(key)], dtype=torch.int64, device=collective_device())  # nccl: on the GPU
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        odd = [r for r in range(world) if int(every[r]) != int(every[0])]
        if odd:
            raise RankMismatchError(
                f"xdit: {self.name}: ranks computed different data-dependent values, so they would compile "
                f"different programs and post collectives of different sizes: rank {dist.get_rank()} has "
                f"{self.describe(results)}; ranks {odd} differ from rank 0. Every rank must pass the same inputs "
                "(masks included): seed every rank alike or broadcast the inputs from rank 0")

    def __call__(self, *args: Any) -> Any:
        fn, extras = self._program(list(args))
        return fn(*args, *extras)


def per_value(gm: fx.GraphModule, example_inputs: Sequence[Any],
              compile_static: Callable[[fx.GraphModule, list[Any]], Callable], check: bool, name: str) -> Callable | None:
    """A ``PerValue`` for ``gm``, or ``None`` (with a WARNING naming why) when it cannot be split."""
    try:
        return PerValue(gm, example_inputs, compile_static, check=check, name=name)
    except Refused as e:
        log.warning("xdit: %s has data-dependent sizes but is not split at them: %s; its data-dependent parts "
                    "run replicated on every rank", name, e)
        return None
