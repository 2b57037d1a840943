"""Recognise the parts of a DiT in a graph: attention, norms, patch embeddings, RoPE tensors.

Reads: Dynamo's graph with example values. Writes: ``node.meta["xdit"]["role"]`` (e.g.
``"attention:joint"``, ``"norm:rms_decomposed"``, ``"patch_embed:conv"``,
``"token_embed:linear"`` (a linear on packed tokens or text), ``"rope"``) and
returns the count per role for the plan report. ``XDIT_LOG=rules`` logs hits per pattern.

Patterns are a table of ``(role, op names, match)``: ``match(node)`` returns the role's
detail or ``None``; nothing here names a model. For example::

    rsqrt(add(mean(pow(x, 2), -1, keepdim=True), eps))  ->  norm:rms_decomposed on x
    conv2d(latent, w, stride=2) with w: [D, C, 2, 2]     ->  patch_embed:conv
    sdpa(q, k, v) where q's tokens come from cat(a, b)   ->  attention:joint
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from ..context import current
from ..graph import arg, has_symbolic_shape, is_tensor, is_user_input, op_name, shape
from ..rules.attention import sdpa_args

log = logging.getLogger("xdit_compile.rules")

# Ops that carry tokens through unchanged in position (walked back through when classifying).
_TOKEN_PRESERVING = {
    "linear", "view", "reshape", "unflatten", "flatten", "permute", "transpose", "contiguous", "to",
    "float", "layer_norm", "rms_norm", "mul", "add", "sub", "truediv", "neg", "getitem", "type_as",
    "half", "bfloat16", "stack", "unbind", "clone", "dropout",
}


@dataclass(frozen=True)
class Pattern:
    role: str
    ops: tuple[str, ...]
    match: Callable[[fx.Node], str | None]


def _first(node: fx.Node) -> fx.Node | None:
    a = node.args[0] if node.args else None
    return a if isinstance(a, fx.Node) else None


def _token_sources(start: fx.Node, length: int, depth: int = 40) -> set[str]:
    """Kinds of token origins behind ``start``: ``"cat"`` if two streams were concatenated."""
    seen: set[fx.Node] = set()
    stack = [(start, 0)]
    found: set[str] = set()
    while stack:
        node, d = stack.pop()
        if node in seen or d > depth or has_symbolic_shape(node):
            continue
        seen.add(node)
        name = op_name(node)
        if name in ("cat", "concat", "concatenate") and is_tensor(node):
            parts = [t for t in arg(node, 0, "tensors") if isinstance(t, fx.Node) and is_tensor(t)]
            dim = arg(node, 1, "dim", 0) % len(shape(node))
            if shape(node)[dim] == length and len(parts) > 1 and all(0 < shape(t)[dim] < length for t in parts):
                found.add("cat")
                continue
        if node.op == "placeholder":
            found.add("input")
            continue
        if name in _TOKEN_PRESERVING:
            for x in node.all_input_nodes:
                if is_tensor(x) and length in shape(x):
                    stack.append((x, d + 1))
    return found


def _attention(node: fx.Node) -> str | None:
    a = sdpa_args(node)
    q, k = a["query"], a["key"]
    if not (is_tensor(q) and is_tensor(k)):
        return None
    sq, sk = shape(q)[-2], shape(k)[-2]
    if sq != sk:
        return "cross"
    return "joint" if "cat" in _token_sources(q, sq) else "self"


def _norm(node: fx.Node) -> str | None:
    return op_name(node)


def _rms_decomposed(node: fx.Node) -> str | None:
    add = _first(node)
    if add is None or op_name(add) != "add":
        return None
    mean = next((x for x in add.all_input_nodes if op_name(x) == "mean"), None)
    if mean is None or not arg(mean, 2, "keepdim", False):
        return None
    sq = _first(mean)
    if sq is None or op_name(sq) != "pow" or (sq.args[1] if len(sq.args) > 1 else None) != 2:
        return None
    return "rms_decomposed"


def _conv_patch(node: fx.Node) -> str | None:
    w = arg(node, 1, "weight")
    if not is_tensor(w):
        return None
    k = shape(w)[2:]
    stride = arg(node, 3, "stride", 1)
    stride = (stride,) * len(k) if isinstance(stride, int) else tuple(stride)
    return "conv" if tuple(k) == stride and max(k) > 1 else None


def _linear_patch(node: fx.Node) -> str | None:
    x = _first(node)
    hops = 0
    while x is not None and x.op != "placeholder" and op_name(x) in ("view", "reshape", "permute", "flatten", "transpose", "contiguous", "to") and hops < 8:
        x = _first(x)
        hops += 1
    if x is not None and x.op == "placeholder" and is_user_input(x) and len(shape(x)) >= 3:
        return "linear" if hops == 0 else "reshape+linear"
    return None


PATTERNS: list[Pattern] = [
    Pattern("attention", ("scaled_dot_product_attention",), _attention),
    Pattern("norm", ("layer_norm", "rms_norm", "group_norm"), _norm),
    Pattern("norm", ("rsqrt",), _rms_decomposed),
    Pattern("patch_embed", ("conv2d", "conv3d"), _conv_patch),
    Pattern("token_embed", ("linear",), _linear_patch),
]
_BY_OP: dict[str, list[Pattern]] = {}
for _p in PATTERNS:
    for _op in _p.ops:
        _BY_OP.setdefault(_op, []).append(_p)


def _mark_rope(gm: fx.GraphModule, counts: Counter) -> None:
    """Tensors multiplied into q or k that do not come from the tokens: positional tables."""
    for node in gm.graph.nodes:
        if op_name(node) != "scaled_dot_product_attention":
            continue
        a = sdpa_args(node)
        for t in (a["query"], a["key"]):
            if not is_tensor(t) or has_symbolic_shape(t):
                continue
            length = shape(t)[-2]
            stack, seen = [(t, 0)], set()
            while stack:
                x, d = stack.pop()
                if x in seen or d > 12 or not isinstance(x, fx.Node) or has_symbolic_shape(x):
                    continue
                seen.add(x)
                if op_name(x) == "mul":
                    for y in x.all_input_nodes:
                        # A positional table spans the tokens; modulation (scale/shift) does not.
                        if not _spans_tokens(y, x, length):
                            continue
                        if _no_token_input(y) and "role" not in y.meta.get("xdit", {}):
                            y.meta.setdefault("xdit", {})["role"] = "rope"
                            counts["rope"] += 1
                if op_name(x) in _TOKEN_PRESERVING or op_name(x) == "mul":
                    stack.extend((y, d + 1) for y in x.all_input_nodes)


def _spans_tokens(y: fx.Node, mul: fx.Node, length: int) -> bool:
    """Whether ``y`` has the token length on the dim that lines up with the tokens of ``mul``."""
    if not is_tensor(y) or length <= 1:
        return False
    out = shape(mul)
    token_dims = [i for i, d in enumerate(out[:-1]) if d == length]
    if not token_dims:
        return False
    j = token_dims[0] - (len(out) - len(shape(y)))
    return 0 <= j < len(shape(y)) and shape(y)[j] == length


def _no_token_input(node: fx.Node, depth: int = 30) -> bool:
    """Whether ``node`` depends on no user input of rank >= 3 (tokens, latents)."""
    stack, seen = [node], set()
    while stack:
        x = stack.pop()
        if x in seen or len(seen) > 200:
            continue
        seen.add(x)
        if x.op == "placeholder":
            if is_user_input(x) and is_tensor(x) and len(shape(x)) >= 3:
                return False
            continue
        stack.extend(x.all_input_nodes)
    return is_tensor(node)


def recognise(gm: fx.GraphModule) -> dict[str, int]:
    """Tag nodes with their role; return the count per ``role:detail``."""
    counts: Counter = Counter()
    hits: Counter = Counter()
    for node in gm.graph.nodes:
        # Data-dependent sizes cannot be compared at compile time: such nodes get no role.
        if has_symbolic_shape(node) or any(has_symbolic_shape(x) for x in node.all_input_nodes):
            continue
        for pattern in _BY_OP.get(op_name(node) or "", ()):
            detail = pattern.match(node)
            if detail is not None:
                role = f"{pattern.role}:{detail}"
                node.meta.setdefault("xdit", {})["role"] = role
                counts[role] += 1
                hits[pattern.match.__name__] += 1
                break
    _mark_rope(gm, counts)
    if current().settings.logs("rules"):
        log.info("xdit recognisers: %s", dict(hits))
    return dict(counts)
