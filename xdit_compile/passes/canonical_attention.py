"""Rewrite attention written as matmuls, ``einsum`` or ``baddbmm`` into one SDPA node.

Research code often spells attention out; the rest of the pipeline (``recognise``, the
attention rule, ``lower``) only knows ``F.scaled_dot_product_attention``. Before/after::

    kt = k.transpose(-2, -1)                        |
    s = (q @ kt) * 0.125                            |  o = scaled_dot_product_attention(
    s = s + mask            # or s.masked_fill(c, -inf) |      q, k, v, attn_mask=mask, scale=0.125)
    p = s.float().softmax(-1).to(q.dtype)           |
    o = p @ v                                       |

Handled: scores from ``q @ kt`` / ``torch.matmul`` / ``bmm`` (``kt`` a transpose of k, or any
[.., D, Sk] tensor, transposed back), ``einsum("..id,..jd->..ij")`` (k also as ``..dj``) and
``baddbmm(x, q, kt, beta=0 or 1, alpha=a)`` (beta 1: ``x`` is an additive mask); then scalar
``*``/``/`` scales, then at most one mask (``+ m`` with a float mask of the query's dtype, or a
``masked_fill(c, v)`` -- out of place, or in place (``s.masked_fill_(c, v)``, CompVis) before the
softmax reads ``s`` -- with ``v`` = -inf (a boolean mask ``~c``; a positive scale may follow it) or
``v <= -1e30`` (an additive mask holding ``v``, which absorbs the scores as the fill did)), casts anywhere,
``softmax`` over the last dim (``dtype=`` too), eval-mode dropout, then ``p @ v`` /
``einsum("..ij,..jd->..id")`` / ``bmm``. A scale on q (or k) before the product stays where it
is. 3-d ([B*H, S, D]) forms get a leading dim of 1 and lose it again after.

Not rewritten (left exactly as written): scores or probabilities with another user (including
any other in-place write, or a fill after the softmax read), a softmax over another dim, a scale after the
mask, two masks, dtypes that differ between q, k, v, the mask and the output, a side-effecting
node between the score product and the output product, symbolic shapes.

Reads: ``node.meta["val"]`` / ``["example_value"]`` (Dynamo's fake values). Writes: the new
nodes' ``meta["example_value"]`` and ``meta["val"]``, and ``meta["xdit"]["canonical"]`` (the form,
e.g. ``"matmul"``) on each new SDPA node; returns the count per ``"attention:<form>"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from ..graph import arg, eliminate_dead_code, has_side_effects, has_symbolic_shape, is_tensor, op_name, shape, value

_CASTS = {"float", "half", "bfloat16", "double", "to", "type_as", "type"}
_SOFTMAX = {"softmax"}
# A fill this negative swallows any score below ~1e22 in float32 / bfloat16 (x + v == v), so an
# additive mask holding it gives what the fill gave, fully masked rows (uniform weights) included.
_HUGE_NEGATIVE = -1e30


@dataclass
class _Match:
    form: str
    q: fx.Node | None
    k: fx.Node | None  # [.., Sk, D]
    k_transposed: bool  # True: ``k`` is [.., D, Sk] and needs a transpose
    v: fx.Node
    v_transposed: bool
    scale: float = 1.0
    mask: Any = None  # fx.Node, or ("not", cond) / ("fill", cond, value)
    chain: list[fx.Node] = field(default_factory=list)  # scores .. output, in graph order
    absorbed: list[fx.Node] = field(default_factory=list)  # in-place fills that became the mask


def _only_user(node: fx.Node, user: fx.Node, absorbed: list[fx.Node] | None = None) -> bool:
    others = [u for u in node.users if u is not user and u not in (absorbed or ())]
    return user in node.users and not others


def _fill_mask(cond: Any, fill: Any) -> Any:
    """The mask a ``masked_fill(cond, fill)`` of the scores stands for, or ``None``."""
    if not (isinstance(cond, fx.Node) and isinstance(fill, (int, float)) and not isinstance(fill, bool)):
        return None
    if fill == float("-inf"):
        return ("not", cond)
    if fill <= _HUGE_NEGATIVE:
        return ("fill", cond, float(fill))
    return None


def _scale_keeps(mask: Any, scale_after: float) -> bool:
    """A scale applied after the mask leaves it as SDPA applies it: -inf stays -inf under a positive
    scale; an additive or finite fill would be scaled too."""
    return scale_after == 1.0 or (mask[0] == "not" and scale_after > 0)


def _inplace_fill(x: fx.Node, user: fx.Node) -> fx.Node | None:
    """``x.masked_fill_(c, v)`` whose result is unused, written after ``x`` is made and before
    ``user`` (the only other reader) reads it: the scores ``user`` sees are the filled ones."""
    fills = [u for u in x.users if u is not user]
    if len(fills) != 1 or user not in x.users:
        return None
    f = fills[0]
    if op_name(f) != "masked_fill_" or f.users or len(f.args) != 3 or f.args[0] is not x or f.kwargs:
        return None
    for node in f.graph.nodes:  # the fill must come first: a later one would not change what user read
        if node is user:
            return None
        if node is f:
            return f
    return None


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_last_two_transpose(node: fx.Node) -> bool:
    """``x.transpose(-2, -1)`` (any spelling of the last two dims), ``x.mT``, ``permute`` swapping them."""
    name = op_name(node)
    if not is_tensor(node):
        return False
    nd = len(shape(node))
    if name in ("transpose", "swapaxes", "swapdims") and len(node.args) >= 3:
        dims = {d % nd for d in node.args[1:3] if isinstance(d, int)}
        return dims == {nd - 2, nd - 1}
    if name == "permute":
        perm = node.args[1:] if len(node.args) > 2 else arg(node, 1, "dims")
        perm = [p % nd for p in perm] if isinstance(perm, (list, tuple)) and all(isinstance(p, int) for p in perm) else None
        return perm == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def _parse_einsum(eq: str) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    return [t.replace("...", "*") for t in terms], out.replace("...", "*")


def _einsum_roles(node: fx.Node, scores: bool) -> tuple[fx.Node, fx.Node, bool] | None:
    """For ``einsum(P+i+d, P+j+d -> P+i+j)`` (scores) or ``(P+i+j, P+j+d -> P+i+d)`` (output):
    the two operands and whether the second is transposed relative to canonical."""
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        eq, ops = node.args[0], list(node.args[1])
    else:
        eq, ops = node.args[0], list(node.args[1:])
    if not isinstance(eq, str) or len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        return None
    parsed = _parse_einsum(eq)
    if parsed is None:
        return None
    (a, b), out = parsed
    if len(a) < 3 or len(a) != len(b) or len(out) != len(a) or a[:-2] != b[:-2] or a[:-2] != out[:-2]:
        return None
    batch = a[:-2]
    x, y = a[-2:]
    if len(set(batch + x + y)) != len(batch) + 2 or "*" in (x + y):
        return None
    if scores:  # a = i d
        i, d = x, y
        if out[-2:] == i + b[-2] and b[-1] == d and b[-2] not in batch + i + d:
            return ops[0], ops[1], False
        if out[-2:] == i + b[-1] and b[-2] == d and b[-1] not in batch + i + d:
            return ops[0], ops[1], True
        return None
    i, j = x, y  # a = i j
    if b[-2] == j and out[-2:] == i + b[-1] and b[-1] not in batch + i + j:
        return ops[0], ops[1], False
    if b[-1] == j and out[-2:] == i + b[-2] and b[-2] not in batch + i + j:
        return ops[0], ops[1], True
    return None


def _output_product(node: fx.Node) -> tuple[str, fx.Node, fx.Node, bool] | None:
    """(form, probabilities, v, v transposed) for ``p @ v`` in any spelling."""
    name = op_name(node)
    if name in ("matmul", "bmm") and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        return ("bmm" if name == "bmm" else "matmul"), node.args[0], node.args[1], False
    if name == "einsum":
        r = _einsum_roles(node, scores=False)
        return None if r is None else ("einsum", *r)
    return None


def _match_scores(node: fx.Node, m: _Match) -> bool:
    """Fill q, k (and a baddbmm mask / scale) from the score product ``node``."""
    name = op_name(node)
    if name in ("matmul", "bmm") and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        m.q, kt = node.args
        m.k, m.k_transposed = (kt.args[0], False) if _is_last_two_transpose(kt) else (kt, True)
        return True
    if name == "einsum":
        r = _einsum_roles(node, scores=True)
        if r is None:
            return False
        m.q, m.k, m.k_transposed = r
        return True
    if name == "baddbmm" and node.op == "call_function" and len(node.args) == 3:
        bias, m.q, kt = node.args
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if set(node.kwargs) - {"beta", "alpha"} or not (_scalar(beta) and _scalar(alpha)) or beta not in (0, 1):
            return False
        if not isinstance(kt, fx.Node):
            return False
        m.k, m.k_transposed = (kt.args[0], False) if _is_last_two_transpose(kt) else (kt, True)
        m.scale = float(alpha)
        if beta == 1:  # beta * bias + alpha * (q @ kt): the bias is an additive mask after the scale
            if not is_tensor(bias):
                return False
            m.mask = bias
        m.form = "baddbmm"
        return True
    return False


def _leads_to_scores(node: fx.Node, user: fx.Node) -> bool:
    """Whether ``node`` is the score product, seen through single-use casts and scales."""
    while _only_user(node, user) and (op_name(node) in _CASTS or op_name(node) in ("mul", "truediv")):
        if not isinstance(node.args[0], fx.Node):
            return False
        node, user = node.args[0], node
    return _only_user(node, user) and op_name(node) in ("matmul", "bmm", "einsum", "baddbmm")


def _softmax_last(node: fx.Node) -> bool:
    if op_name(node) not in _SOFTMAX or not is_tensor(node):
        return False
    dim = arg(node, 1, "dim")
    return isinstance(dim, int) and dim % len(shape(node)) == len(shape(node)) - 1


def _dropout_off(node: fx.Node) -> bool:
    if op_name(node) != "dropout":
        return False
    p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    return p == 0 or training is False


def _match(out: fx.Node) -> _Match | None:
    """The attention ending at ``out`` (the product with v), or ``None``."""
    prod = _output_product(out)
    if prod is None:
        return None
    form, p, v, v_t = prod
    m = _Match(form, None, None, False, v, v_t)
    chain = [out]
    x = p
    # Backwards from the probabilities: casts and eval-mode dropout, then softmax.
    while isinstance(x, fx.Node) and (op_name(x) in _CASTS or _dropout_off(x)) and not _softmax_last(x):
        if not _only_user(x, chain[-1]):
            return None
        chain.append(x)
        x = x.args[0]
    if not (isinstance(x, fx.Node) and _softmax_last(x) and _only_user(x, chain[-1])):
        return None
    chain.append(x)
    x = x.args[0]
    # Then, backwards: casts, at most one mask, scalar scales, the score product.
    seen_mask = False
    while isinstance(x, fx.Node):
        fill = _inplace_fill(x, chain[-1])
        if fill is not None:
            mask = _fill_mask(fill.args[1], fill.args[2])
            if mask is None or seen_mask or not _scale_keeps(mask, m.scale):
                return None
            m.mask, seen_mask = mask, True
            m.absorbed.append(fill)
        if not _only_user(x, chain[-1], m.absorbed):
            return None
        name = op_name(x)
        if name in _CASTS:
            pass
        elif name in ("mul", "truediv") and len(x.args) == 2:
            a, b = x.args
            if name == "mul" and _scalar(a) and isinstance(b, fx.Node):
                a, b = b, a
            if not (isinstance(a, fx.Node) and _scalar(b) and b != 0):
                return None
            m.scale *= b if name == "mul" else 1.0 / b
            chain.append(x)
            x = a
            continue
        elif name == "add" and len(x.args) == 2 and not x.kwargs and not seen_mask and m.scale == 1.0:
            a, b = x.args
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return None
            if not _leads_to_scores(a, x) and _leads_to_scores(b, x):
                a, b = b, a
            m.mask, seen_mask = b, True
            chain.append(x)
            x = a
            continue
        elif name == "masked_fill" and len(x.args) == 3 and not seen_mask:
            s, cond, fill = x.args
            m.mask = _fill_mask(cond, fill)
            if m.mask is None or not _scale_keeps(m.mask, m.scale):
                return None
            seen_mask = True
            chain.append(x)
            x = s
            continue
        else:
            scale_after, mask_after = m.scale, m.mask
            m.scale, m.mask = 1.0, None
            if not _match_scores(x, m):
                return None
            if m.mask is not None and (mask_after is not None or scale_after != 1.0):
                return None  # baddbmm's bias would be a second mask, or scaled after the fact
            m.scale *= scale_after
            m.mask = m.mask if m.mask is not None else mask_after
            chain.append(x)
            break
        chain.append(x)
        x = x.args[0]
    else:
        return None
    if m.q is None:
        return None
    m.chain = list(reversed(chain))
    return m if _valid(m) else None


def _valid(m: _Match) -> bool:
    """Shapes and dtypes that SDPA computes the same way the written form did."""
    nodes = [m.q, m.k, m.v, m.chain[-1]]
    if not all(is_tensor(n) for n in nodes + m.chain) or any(has_symbolic_shape(n) for n in nodes + m.chain):
        return False
    nd = len(shape(m.q))
    if nd not in (3, 4) or any(len(shape(n)) != nd for n in nodes):
        return False
    dtypes = {value(n).dtype for n in nodes}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return False
    q, k, v = shape(m.q), shape(m.k), shape(m.v)
    if m.k_transposed:
        k = k[:-2] + (k[-1], k[-2])
    if m.v_transposed:
        v = v[:-2] + (v[-1], v[-2])
    if not (q[:-2] == k[:-2] == v[:-2] and q[-1] == k[-1] and k[-2] == v[-2]):
        return False
    if shape(m.chain[-1]) != q[:-1] + (v[-1],):
        return False
    mask = m.mask
    if isinstance(mask, fx.Node):
        if not is_tensor(mask) or value(mask).dtype != value(m.q).dtype or len(shape(mask)) > nd:
            return False
    elif isinstance(mask, tuple):
        if not is_tensor(mask[1]) or value(mask[1]).dtype != torch.bool or len(shape(mask[1])) > nd:
            return False
    # Nothing between the score product and the output may write what the new node reads later.
    inside = False
    first, last = m.chain[0], m.chain[-1]
    for node in first.graph.nodes:
        if node is first:
            inside = True
        elif node is last:
            break
        elif inside and has_side_effects(node) and node not in m.absorbed:
            return False
    return True


def _call(graph: fx.Graph, target: Callable, args: tuple, kwargs: dict | None = None, name: str | None = None) -> fx.Node:
    """A new node whose fake value is computed now, as Dynamo's nodes carry theirs."""
    kwargs = kwargs or {}
    node = graph.create_node("call_function", target, args, kwargs, name=name)
    vals_args, vals_kwargs = fx.node.map_arg((args, kwargs), value)
    tensors = [t for t in _flat((vals_args, vals_kwargs)) if isinstance(t, torch.Tensor)]
    mode = detect_fake_mode(tensors[:1])
    if mode is None:
        out = target(*vals_args, **vals_kwargs)
    else:
        with mode:
            # Passes before this one may have refreshed some values under another fake mode;
            # shapes are static here, so a same-shaped tensor of this mode stands in for them.
            def same_mode(t: Any) -> Any:
                if isinstance(t, torch.Tensor) and getattr(t, "fake_mode", mode) is not mode:
                    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                return t

            vals_args, vals_kwargs = fx.node.map_aggregate((vals_args, vals_kwargs), same_mode)
            out = target(*vals_args, **vals_kwargs)
    node.meta["example_value"] = out
    node.meta["val"] = out
    return node


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for z in x for y in _flat(z)]
    if isinstance(x, dict):
        return [y for z in x.values() for y in _flat(z)]
    return [x]


def _rewrite(gm: fx.GraphModule, m: _Match) -> None:
    g = gm.graph
    out = m.chain[-1]
    dtype = value(m.q).dtype
    with g.inserting_before(out):
        q, k, v = m.q, m.k, m.v
        if m.k_transposed:
            k = _call(g, torch.transpose, (k, -2, -1))
        if m.v_transposed:
            v = _call(g, torch.transpose, (v, -2, -1))
        mask = m.mask
        if isinstance(mask, tuple) and mask[0] == "not":
            mask = _call(g, torch.logical_not, (mask[1],))
        elif isinstance(mask, tuple):
            zeros = _call(g, torch.zeros_like, (mask[1],), {"dtype": dtype})
            mask = _call(g, torch.masked_fill, (zeros, mask[1], mask[2]))
        three_d = len(shape(q)) == 3
        if three_d:  # SDPA's rule and lowering expect [B, H, S, D]: B*H becomes the heads
            q, k, v = (_call(g, torch.unsqueeze, (t, 0)) for t in (q, k, v))
            if isinstance(mask, fx.Node) and len(shape(mask)) == 3:
                mask = _call(g, torch.unsqueeze, (mask, 0))
        kwargs: dict[str, Any] = {"scale": m.scale}
        if mask is not None:
            kwargs = {"attn_mask": mask, **kwargs}
        o = _call(g, F.scaled_dot_product_attention, (q, k, v), kwargs, name=f"attention_{m.form}")
        o.meta.setdefault("xdit", {})["canonical"] = m.form
        if three_d:
            o = _call(g, torch.squeeze, (o, 0))
    out.replace_all_uses_with(o)
    for node in m.absorbed:
        g.erase_node(node)
    for node in reversed(m.chain):
        if not node.users:
            g.erase_node(node)


def canonical_attention(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite every spelled-out attention in ``gm`` into one SDPA node; counts per form."""
    counts: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op not in ("call_function", "call_method"):
            continue
        m = _match(node)
        if m is None:
            continue
        _rewrite(gm, m)
        key = f"attention:{m.form}"
        counts[key] = counts.get(key, 0) + 1
    if counts:
        eliminate_dead_code(gm.graph)
        gm.recompile()
    return counts
