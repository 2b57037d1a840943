"""Elementwise ops with broadcasting: the output is sharded like its sharded inputs.

    add(x: S(1), pos: R[1, S, D])  ->  S(1)     pos is sliced to S(1) on each rank (free)
    mul(x: S(1), scale: R[B, 1, D]) ->  S(1)    size-1 dims broadcast and stay replicated
    add(a: P, b: P) -> P;  mul(a: P, b: R) -> P   (sums stay sums)
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph import shape
from ..placements import PARTIAL, REPLICATE, Partial, Placement, Replicate, Shard
from .core import Decision, OpView, align_to

UNARY = [
    "neg", "pos", "abs", "exp", "exp2", "expm1", "log", "log1p", "log2", "sin", "cos", "tan", "tanh",
    "sigmoid", "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "mish", "softplus",
    "hardswish", "hardsigmoid", "erf", "erfc", "sqrt", "rsqrt", "square", "reciprocal", "sign",
    "floor", "ceil", "round", "trunc", "frac", "clamp", "clip", "clamp_min", "clamp_max",
    "nan_to_num", "logical_not", "bitwise_not", "invert", "isnan", "isinf", "isfinite",
    "float", "double", "half", "bfloat16", "int", "long", "bool", "to", "type", "contiguous",
    "clone", "detach", "dropout", "alpha_dropout", "feature_alpha_dropout", "requires_grad_",
    "cpu", "cuda",
]
BINARY = [
    "add", "sub", "rsub", "mul", "truediv", "div", "floordiv", "floor_divide", "mod", "remainder",
    "pow", "maximum", "minimum", "fmax", "fmin", "atan2", "lt", "le", "gt", "ge", "eq", "ne",
    "logical_and", "logical_or", "logical_xor", "and_", "or_", "xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "hypot", "copysign",
    "type_as",
]
# In-place variants that torch has (a method, or a torch / torch.nn.functional function):
# names Dynamo can put in a graph.
INPLACE = [name + "_" for name in UNARY + BINARY if not name.endswith("_") and (
    hasattr(torch.Tensor, name + "_") or hasattr(torch, name + "_") or hasattr(F, name + "_"))] + [
    "iadd", "isub", "imul", "itruediv",
]

# Ops whose output is linear in a Partial input (so the sum can stay unreduced). A Partial
# may only go through ops linear in it: anything else (rounding, integer casts, a constant
# added once per rank) must see the reduced value, so the propagation reduces it first.
_LINEAR_IN_PARTIAL = {"add", "sub", "neg", "to", "float", "double", "half", "bfloat16", "contiguous",
                      "clone", "detach", "iadd", "isub"}
_SUMS = {"add", "sub", "iadd", "isub"}
_CASTS = {"to", "float", "double", "half", "bfloat16"}
_SCALES_PARTIAL = {"mul", "truediv", "div", "imul", "itruediv"}


def _operands(op: OpView) -> list[object]:
    """The two operands of a binary op, positional or by keyword (``other=``)."""
    return [op.arg(0, "input"), op.arg(1, "other")]


def _partial_stays(op: OpView, partial: list[fx.Node], pls: list[Placement]) -> bool:
    """Whether the op is linear in its Partial inputs, so that its output is Partial too."""
    if op.name in _LINEAR_IN_PARTIAL and all(isinstance(p, Partial) for p in pls):
        if op.name in _SUMS:
            # x + 1 would add the constant once per rank: every operand must be a Partial.
            return all(isinstance(x, fx.Node) and isinstance(op.pl(x), Partial) for x in _operands(op))
        if op.name in _CASTS:
            # A cast to an integer or bool dtype rounds each summand: not linear.
            out = op.out_value
            return out.dtype.is_floating_point or out.dtype.is_complex
        return True
    if op.name in _SCALES_PARTIAL and len(partial) == 1:
        if op.node.kwargs.get("rounding_mode") is not None:
            return False  # floor / trunc division rounds each summand
        a, b = _operands(op)
        if op.name in ("mul", "imul"):
            return partial[0] in (a, b)
        return a is partial[0] and b is not partial[0]  # P / c is linear, c / P is not
    return False


def _data_inputs(op: OpView) -> list[fx.Node]:
    # type_as(other) and to(other) read only other's dtype, not its data.
    if op.name in ("type_as", "to") and len(op.node.args) >= 1:
        first = op.node.args[0]
        return [first] if isinstance(first, fx.Node) else []
    return op.tensor_inputs()


def pointwise(op: OpView) -> Decision | None:
    inputs = _data_inputs(op)
    # Inputs read only for their dtype (type_as / to(other)) may stay as they are.
    extra: dict[fx.Node, Placement] = {}
    pls = [op.pl(x) for x in inputs]
    if all(isinstance(p, Replicate) for p in pls):
        return Decision(REPLICATE, extra)
    partial = [x for x, p in zip(inputs, pls) if isinstance(p, Partial)]
    if partial and not any(isinstance(p, Shard) for p in pls) and _partial_stays(op, partial, pls):
        return Decision(PARTIAL, extra)
    out_ndim = op.out_ndim
    # Candidate output shards, largest input first: each input's shard mapped to output dims.
    candidates = []
    for x, p in sorted(zip(inputs, pls), key=lambda xp: -_numel(shape(xp[0]))):
        if isinstance(p, Shard):
            candidates.append(p.with_dim(p.dim + out_ndim - len(shape(x))))
    for target in candidates:
        needs = align_to(op, inputs, target, out_ndim)
        if needs is not None:
            if op.name in INPLACE or op.name.endswith("_"):
                self_node = op.node.args[0]
                if self_node in needs:
                    continue
            needs.update(extra)
            return Decision(target, needs)
    return None


def _numel(s: tuple[int, ...]) -> int:
    out = 1
    for d in s:
        out *= int(d)
    return out


TABLE = [
    (UNARY + BINARY + INPLACE, pointwise),
]
