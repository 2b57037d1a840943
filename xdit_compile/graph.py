"""Small helpers over Dynamo's torch-level fx graphs: op names, example values, inputs."""

from __future__ import annotations

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
