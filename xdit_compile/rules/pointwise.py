"""Elementwise ops with broadcasting: the output is sharded like its sharded inputs.

    add(x: S(1), pos: R[1, S, D])  ->  S(1)     pos is sliced to S(1) on each rank (free)
    mul(x: S(1), scale: R[B, 1, D]) ->  S(1)    size-1 dims broadcast and stay replicated
    add(a: P, b: P) -> P;  mul(a: P, b: R) -> P   (sums stay sums)
"""

from __future__ import annotations

import torch.fx as fx

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
    "type_as", "expand_as_unused",
]
INPLACE = [name + "_" for name in UNARY + BINARY if not name.endswith("_")] + [
    "iadd", "isub", "imul", "itruediv",
]

# Ops whose output is linear in a Partial input (so the sum can stay unreduced).
_LINEAR_IN_PARTIAL = {"add", "sub", "neg", "to", "float", "double", "half", "bfloat16", "contiguous",
                      "clone", "detach", "iadd", "isub"}
_SCALES_PARTIAL = {"mul", "truediv", "div", "imul", "itruediv"}


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
    if partial and not any(isinstance(p, Shard) for p in pls):
        # A constant operand (x + 1) would be added once per rank: only sums of partials.
        scalars = [a for a in op.node.args if not isinstance(a, fx.Node) and isinstance(a, (int, float, bool))]
        if op.name in _LINEAR_IN_PARTIAL and all(isinstance(p, Partial) for p in pls) and (
            not scalars or op.name not in ("add", "sub", "iadd", "isub")
        ):
            return Decision(PARTIAL, extra)
        if op.name in _SCALES_PARTIAL and len(partial) == 1 and (
            op.name in ("mul", "imul") or inputs.index(partial[0]) == 0
        ):
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
