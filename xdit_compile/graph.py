"""Small helpers over Dynamo's torch-level fx graphs: op names, example values, inputs."""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
import torch.fx as fx

_OPERATOR_NAMES = {getattr(operator, n): n for n in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "getitem",
    "setitem", "matmul", "and_", "or_", "xor", "invert", "lt", "le", "gt", "ge", "eq", "ne",
    "iadd", "isub", "imul", "itruediv",
)}


def op_name(node: fx.Node) -> str | None:
    """Canonical op name of a call node: method name, torch function name or operator name.

    ``x.view(...)``, ``torch.Tensor.view(x, ...)`` and ``torch.view(...)`` all give ``"view"``.
    Our own runtime functions carry an ``_xdit_op`` attribute with their name.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    t = node.target
    if t in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[t]
    xop = getattr(t, "_xdit_op", None)
    if xop is not None:
        return xop
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    return getattr(t, "__name__", None)


def value(node: Any) -> Any:
    """The example (fake) value of a node: a tensor, a tuple, an int, or ``None`` if unknown."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(value(node), torch.Tensor)


def shape(node: Any) -> tuple[int, ...]:
    """Global static shape of a tensor node (symbolic sizes are returned as they are)."""
    return tuple(value(node).shape)


def has_symbolic_shape(node: fx.Node) -> bool:
    v = value(node)
    tensors = v if isinstance(v, (tuple, list)) else (v,)
    for t in tensors:
        if isinstance(t, torch.Tensor) and any(not isinstance(s, int) for s in t.shape):
            return True
        if isinstance(t, torch.SymInt):
            return True
    return False


def is_user_input(node: fx.Node) -> bool:
    """Whether a placeholder is a caller's argument, not a parameter, buffer or global."""
    if node.op != "placeholder":
        return False
    v = value(node)
    if isinstance(v, torch.nn.Parameter):
        return False
    ga = node.meta.get("grapharg")
    source = ga.source.name if ga is not None and ga.source is not None else ""
    if callable(source):
        source = source()
    if not source:
        return not node.name.startswith(("L_self", "l_self"))
    if "_buffers" in source or "_parameters" in source:  # a module's state reached through a closure or argument
        return False
    return source.startswith("L[") and not source.startswith("L['self']")


def input_label(node: fx.Node) -> str:
    """Readable name of a placeholder: the caller's argument path when Dynamo recorded it."""
    ga = node.meta.get("grapharg")
    source = ga.source.name if ga is not None and ga.source is not None else None
    if callable(source):
        source = source()
    return str(source) if source else node.name



def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional, counting ``self`` for methods) or keyword ``name``."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


# In-place-looking names that do not write their first argument's data.
_NOT_MUTATING = frozenset({"requires_grad_", "and_", "or_", "xor_", "not_", "is_", "is_not_"})
_AUGMENTED = frozenset({"setitem", "iadd", "isub", "imul", "itruediv"})


@functools.lru_cache(maxsize=None)
def _inplace_position(target: Any) -> int | None:
    """Where a Python function takes ``inplace`` positionally (``None``: it has no such parameter)."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _inplace_flag(node: fx.Node) -> bool:
    """``inplace=True`` given by keyword or by position (``F.relu(x, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function" or len(node.args) < 2:
        return False
    try:
        i = _inplace_position(node.target)
    except TypeError:  # an unhashable target
        return False
    return i is not None and i < len(node.args) and node.args[i] is True


def _schema_writes(node: fx.Node) -> list[fx.Node]:
    """Arguments an operator's schema marks as written (``Tensor(a!)``): custom ops with mutable args."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        x = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
        out.extend(t for t in (x if isinstance(x, (tuple, list)) else (x,)) if isinstance(t, fx.Node))
    return out


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The input nodes whose data ``node`` writes: every in-place spelling Dynamo produces.

    ``x.add_(y)`` / ``torch.relu_(x)`` (names ending in ``_``), ``x[i] = y`` / ``x += y``,
    ``F.silu(x, inplace=True)``, ``torch.add(a, b, out=c)``, and operators whose schema marks an
    argument mutable (``torch.library.custom_op(..., mutates_args=...)``).
    """
    if node.op not in ("call_function", "call_method"):
        return []
    out: list[fx.Node] = []
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    name = op_name(node)
    if first is not None and name and (
        (name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING) or name in _AUGMENTED
        or _inplace_flag(node)
    ):
        out.append(first)
    dest = node.kwargs.get("out")
    out.extend(t for t in (dest if isinstance(dest, (tuple, list)) else (dest,)) if isinstance(t, fx.Node))
    if node.op == "call_function":
        out.extend(_schema_writes(node))
    return list(dict.fromkeys(out))


def has_side_effects(node: fx.Node) -> bool:
    """Whether removing ``node`` could change the program even if nothing reads its result.

    fx's own ``Node.is_impure`` misses in-place methods (``x.masked_fill_(m, v)`` as a statement)
    and ``inplace=True`` keywords; every pass that eliminates dead code must use this instead.
    """
    return node.is_impure() or bool(written_inputs(node))


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """``graph.eliminate_dead_code`` that never drops a node with side effects."""
    return graph.eliminate_dead_code(is_impure_node=has_side_effects)


def complete_marks(gm: fx.GraphModule, mark: Any) -> tuple[dict[fx.Node, int], tuple[fx.Node, fx.Node] | None]:
    """Every call node's segment (a pipeline's stage, a step cache's part) from ``mark(node)``, which
    gives it for the nodes the planner marked and ``None`` for the others (nodes the passes inserted).

    An unmarked node joins the latest segment among its inputs, else the earliest among its users
    (else 0); a ``getitem`` of a tuple stays with the tuple (tuples never cross a boundary). Returns
    the segments and the first ``(node, input)`` where a node reads a later segment (``None`` if none):
    the caller names what that breaks.
    """
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    seg: dict[fx.Node, int] = {}
    deferred = []
    for n in calls:
        s = mark(n)
        known = [seg[x] for x in n.all_input_nodes if x in seg]
        if s is None and known:
            s = max(known)
        if s is None:
            deferred.append(n)
        else:
            seg[n] = s
    for n in reversed(deferred):
        users = [seg[u] for u in n.users if u in seg]
        seg[n] = min(users) if users else 0
    for n in calls:
        if op_name(n) == "getitem" and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in seg:
            if not isinstance(value(n.args[0]), torch.Tensor):
                seg[n] = seg[n.args[0]]
    for n in calls:
        for x in n.all_input_nodes:
            if x in seg and seg[x] > seg[n]:
                return seg, (n, x)
    return seg, None
