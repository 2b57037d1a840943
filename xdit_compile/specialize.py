"""Compile a graph with symbolic sizes once per concrete shape, so a new shape stays parallel.

With torch.compile's default ``dynamic=None``, the second resolution or batch size makes Dynamo
recompile the frame with symbolic sizes: ``SymInt`` placeholders (``s33``) and tensors shaped
``[2, 4, s33, s20]``. The passes shard static shapes only, so instead of running such a graph
replicated the backend returns a ``PerShape`` callable. On each call it looks up the concrete
sizes of the arguments; on a new signature it specialises the graph to them and runs the
whole static pipeline (passes, then the inner compiler) on the result::

    s33: SymInt, x: f32[2, 4, s33, s20]          s33: SymInt (unused), x: f32[2, 4, 24, 24]
    floordiv = s33 // 2                  ->      (folded)
    arange = torch.arange(floordiv)              arange = torch.arange(12)
    y = h.reshape(-1, floordiv, ...)             y = h.reshape(-1, 12, ...)

The placeholders stay, so the specialised graph takes exactly the arguments Dynamo passes.
Compiled programs are cached by signature (``CACHE_SIZE`` entries, least recently used out).
Sizes that depend on data (``nonzero``) stay unbacked ``SymInt``s, as in a static graph (which
the backend then splits at those values: ``dynamic_values.py``). If
specialising fails, that graph runs replicated with a WARNING and a plan report naming the cause
and the fix (under PipeFusion, or with ``XDIT_STRICT=1``, it raises instead).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .graph import has_side_effects, input_label, value
from .passes.refresh_meta import refresh_meta

log = logging.getLogger("xdit_compile")

CACHE_SIZE = 8
FIX = "compile with torch.compile(..., dynamic=False) so that every new shape recompiles with static sizes"

Signature = tuple[Any, ...]


def _symbolic(v: Any) -> bool:
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(v, torch.Tensor):
        return any(not isinstance(s, int) for s in (*v.shape, *v.stride()))
    return False


def symbolic_inputs(gm: fx.GraphModule) -> list[int]:
    """Flat indices of the placeholders whose example value has a symbolic size (or is a SymInt)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(phs) if _symbolic(value(n))]


def signature(args: Sequence[Any], indices: Sequence[int]) -> Signature:
    """The concrete sizes of a call: ints as they are, tensors by shape and stride."""
    out: list[Any] = []
    for i in indices:
        x = args[i]
        out.append((tuple(x.shape), x.stride()) if isinstance(x, torch.Tensor) else x)
    return tuple(out)


def describe(gm: fx.GraphModule, args: Sequence[Any], indices: Sequence[int]) -> str:
    """``L['hidden_states'] (2, 4, 24, 24)``: the sizes a specialisation is for.

    SymInts that are sizes of tensor inputs are left out (the tensors' shapes say them).
    """
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    parts = []
    for i in indices:
        x, label = args[i], input_label(phs[i])
        if isinstance(x, torch.Tensor):
            parts.append(f"{label} {tuple(x.shape)}")
        elif ".size()" not in label and ".stride()" not in label:
            parts.append(f"{label}={x}")
    return ", ".join(parts)


def _scalar(v: Any) -> bool:
    if isinstance(v, bool | int | float):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, bool | int | float) for x in v)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose nodes own shallow copies of the original nodes' meta."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    return new


def specialise(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    """A copy of ``gm`` with every size fixed to those of ``args`` (see the module docstring).

    Reads: ``gm`` (untouched) and the concrete ``args``. Writes, on the copy: ``node.meta["val"]``
    and ``node.meta["example_value"]`` (static fake values, by ``refresh_meta``); scalar nodes
    computed from sizes are folded into their users as literals and erased; ``meta["xdit"]`` is
    not carried over (the passes write it afresh per shape).
    """
    new = _copy(gm)
    for node in new.graph.nodes:
        node.meta.pop("xdit", None)
    refresh_meta(new, args)
    for node in list(new.graph.nodes):
        v = node.meta.get("val")
        if not _scalar(v) or node.op not in ("placeholder", "call_function", "call_method") or has_side_effects(node):
            continue
        literal = tuple(v) if isinstance(v, (tuple, list)) else v
        node.replace_all_uses_with(literal)  # type: ignore[arg-type]
        if node.op != "placeholder":
            new.graph.erase_node(node)
    new.recompile()
    return new


class PerShape:
    """The callable the backend returns for a graph with symbolic sizes.

    ``compile_static(graph, example_inputs)`` is the backend itself on a static graph; what it
    returns for a shape is what runs for every later call of that shape (a rank-agreement or
    gradient wrapper it adds included). ``fallback(cause)`` gives the program to run when a
    shape cannot be specialised (or raises).
    """

    def __init__(self, gm: fx.GraphModule, compile_static: Callable[[fx.GraphModule, list[Any]], Callable],
                 fallback: Callable[[str], Callable] | None = None, cache_size: int = CACHE_SIZE):
        # Dynamo drops the placeholders' ``grapharg`` meta once the backend returns; the copy
        # keeps it, so specialised graphs still tell user inputs from parameters by source.
        self.gm = _copy(gm)
        self.compile_static = compile_static
        self.fallback = fallback
        self.indices = symbolic_inputs(gm)
        self.cache: OrderedDict[Signature, Callable] = OrderedDict()
        self.cache_size = cache_size
        self.compiled = 0  # shapes compiled so far (evicted ones compile again)

    def __call__(self, *args: Any) -> Any:
        key = signature(args, self.indices)
        fn = self.cache.get(key)
        if fn is None:
            fn = self._compile(key, args)
        else:
            self.cache.move_to_end(key)
        return fn(*args)

    def _compile(self, key: Signature, args: Sequence[Any]) -> Callable:
        sizes = describe(self.gm, args, self.indices)
        if len(self.cache) >= self.cache_size:
            self.cache.popitem(last=False)
            log.warning("xdit: more than %d shapes of one graph (new: %s); dropped the least recently used, "
                        "which compiles again if it comes back. An int argument that changes every call "
                        "compiles a program per value: pass it as a tensor", self.cache_size, sizes)
        log.info("xdit: graph with symbolic sizes: compiling a static program for %s (%d cached)",
                 sizes, len(self.cache))
        from .report import reports

        before = len(reports())
        try:
            static = specialise(self.gm, args)
        except Exception as e:
            if self.fallback is None:
                raise
            fn = self.fallback(f"specialising it to {sizes} failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            self.cache[key] = fn
            return fn
        fn = self.compile_static(static, list(args))
        for report in reports()[before:]:
            report.graph += f" [specialised to {sizes}]"
        self.cache[key] = fn
        self.compiled += 1
        return fn


def per_shape(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: Any, compile_static: Callable[[fx.GraphModule, list[Any]], Callable],
              inner: Callable[[Any, fx.GraphModule, Sequence[Any]], Callable]) -> Callable:
    """What the backend returns for a graph with symbolic sizes (``plan`` resolved for it): a ``PerShape``.

    A shape that cannot be specialised runs ``gm`` itself, replicated, through ``inner``, with a
    WARNING and a plan report naming the cause and the fix; under PipeFusion, or with
    ``XDIT_STRICT=1``, that raises instead.
    """
    import torch.distributed as dist

    from .context import current
    from .errors import PassError, PlanError
    from .report import PlanReport, publish, reports

    template, replicated = _copy(gm), []  # the graph as Dynamo handed it, compiled once if ever needed
    example_inputs = list(example_inputs)

    def fallback(why: str) -> Callable:
        cause = f"this graph has symbolic sizes (a new shape under torch.compile's default dynamic=None), and {why}"
        if plan.degree("pp") > 1:
            raise PlanError(f"pipefusion needs static shapes: {cause}; {FIX}")
        if current().settings.is_strict():
            raise PassError(f"xdit: {cause}; {FIX}")
        log.warning("xdit: %s: it runs REPLICATED on every rank (each rank does all the work); %s", cause, FIX)
        publish(PlanReport(f"graph {len(reports())}", plan.describe(), dist.get_rank(), dist.get_world_size(),
                           len(template.graph.nodes), fallback=f"{cause}; {FIX}"))
        if not replicated:
            replicated.append(inner(plan, template, example_inputs))
        return replicated[0]

    return PerShape(gm, compile_static, fallback)
