"""Decompose ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) into SDPA and linears.

Dynamo hands ``nn.MultiheadAttention`` to a backend as one opaque call on sequence-first
tensors (``batch_first=True`` adds a ``transpose(1, 0)`` before and after; boolean masks arrive
already turned into ``-inf`` float masks). Nothing has a rule for it, so it ran replicated.
This pass spells it out in the node forms ``recognise``, the sharding rules and ``lower``
understand. Before/after (query [L, N, E], key/value [S, N, E])::

    r = multi_head_attention_forward(q, k, v, E, H,   |  p = linear(q, in_w, in_b)         # q is k is v
            in_w, in_b, None, None, False, 0.0,       |  q, k, v = p.chunk(3, -1)          # else 3 linears
            out_w, out_b, training=False,             |  q = q.reshape(L, N, H, E/H).permute(1, 2, 0, 3)  # k, v alike
            key_padding_mask=kpm, attn_mask=am,       |  m = am + kpm.reshape(N, 1, 1, S)     # bool: -inf fill
            need_weights=False)                       |  o = scaled_dot_product_attention(q, k, v, attn_mask=m)
    o = r[0]                                          |  o = linear(o.permute(2, 0, 1, 3).reshape(L, N, E), out_w, out_b)

Handled: the packed in-projection (one fused linear when q, k and v are one node, otherwise the
weight chunked into three), separate q/k/v projection weights (``kdim`` / ``vdim`` != ``embed_dim``),
biases or none, ``attn_mask`` [L, S] or [N*H, L, S] and ``key_padding_mask`` [N, S], float (of the
query's dtype) or boolean, alone or together, eval mode or ``dropout_p == 0``.

Left as written (runs replicated; the reason goes to the report and to the node's
``meta["xdit"]["why_replicated"]``): ``need_weights=True`` (the averaged weights are a second
output), ``bias_k`` / ``bias_v`` / ``add_zero_attn`` (extra key columns), ``static_k`` /
``static_v``, ``is_causal=True``, unbatched (2-d) inputs, train-mode dropout, symbolic shapes,
dtypes that differ between inputs, weights and masks.

Reads: ``node.meta["val"]`` / ``["example_value"]``. Writes: the new nodes' fake values,
``meta["xdit"]["canonical"] = "mha"`` on each new SDPA node and ``meta["xdit"]["why_replicated"]``
on calls left alone; returns the count per ``"attention:mha"`` / ``"attention:mha_separate_proj"``
and ``"left:mha (<reason>)"``.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph import eliminate_dead_code, has_symbolic_shape, is_tensor, op_name, shape, value
from .canonical_attention import _call

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _bind(node: fx.Node) -> dict[str, Any] | None:
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _why_not(node: fx.Node, a: dict[str, Any]) -> str | None:
    """Why this call cannot be decomposed exactly, or ``None``."""
    if a["need_weights"]:
        return "need_weights=True returns the attention weights as well"
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return "bias_k / bias_v / add_zero_attn add key columns that are not decomposed"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "static_k / static_v are not decomposed"
    if a["is_causal"]:
        return "is_causal=True (causal attention over a sharded sequence is not lowered)"
    if a["training"] and a["dropout_p"]:
        return "train-mode dropout draws random numbers"
    q, k, v = a["query"], a["key"], a["value"]
    tensors = [t for t in (q, k, v, a["attn_mask"], a["key_padding_mask"]) if isinstance(t, fx.Node)]
    if not all(is_tensor(t) for t in (q, k, v)) or any(len(shape(t)) != 3 for t in (q, k, v)):
        return "unbatched (2-d) or unknown inputs"
    if any(has_symbolic_shape(t) for t in tensors) or has_symbolic_shape(node):
        return "symbolic shapes"
    dtype = value(q).dtype
    if not dtype.is_floating_point or value(k).dtype != dtype or value(v).dtype != dtype:
        return "query, key and value differ in dtype"
    for m in (a["attn_mask"], a["key_padding_mask"]):
        if m is not None and not (is_tensor(m) and value(m).dtype in (dtype, torch.bool)):
            return "a mask that is neither boolean nor of the query's dtype"
    L, N, E = shape(q)
    S = shape(k)[0]
    H = a["num_heads"]
    if not isinstance(H, int) or E % H or a["embed_dim_to_check"] != E or shape(v)[:2] != (S, N):
        return "shapes do not match embed_dim / num_heads"
    am, kpm = a["attn_mask"], a["key_padding_mask"]
    if am is not None and shape(am) not in ((L, S), (N * H, L, S)):
        return f"attn_mask of shape {tuple(shape(am))}"
    if kpm is not None and shape(kpm) != (N, S):
        return f"key_padding_mask of shape {tuple(shape(kpm))}"
    if a["use_separate_proj_weight"]:
        if any(not is_tensor(a[w]) for w in ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            return "separate projection weights missing"
    elif not is_tensor(a["in_proj_weight"]):
        return "no in_proj_weight"
    # Only the attention output may be read: the weights slot is None here.
    if any(not (op_name(u) == "getitem" and u.args[1] in (0, 1)) or (u.args[1] == 1 and u.users)
           for u in node.users):
        return "its result is used other than through [0]"
    return None


def _additive(g: fx.Graph, m: fx.Node, dtype: torch.dtype) -> fx.Node:
    """A boolean mask (True = masked out) as the ``-inf`` float mask MHA itself makes of it."""
    if value(m).dtype != torch.bool:
        return m
    zeros = _call(g, torch.zeros_like, (m,), {"dtype": dtype})
    return _call(g, torch.masked_fill, (zeros, m, float("-inf")))


def _rewrite(gm: fx.GraphModule, node: fx.Node, a: dict[str, Any]) -> str:
    g = gm.graph
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    L, N, E = shape(q_in)
    S = shape(k_in)[0]
    H = a["num_heads"]
    hd = E // H
    dtype = value(q_in).dtype
    with g.inserting_before(node):
        bias = a["in_proj_bias"]
        if a["use_separate_proj_weight"]:
            form = "mha_separate_proj"
            ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
            bs: list[Any] = [None] * 3
            if bias is not None:
                chunks = _call(g, torch.chunk, (bias, 3))
                bs = [_call(g, operator.getitem, (chunks, i)) for i in range(3)]
            q, k, v = (_call(g, F.linear, (x, w, b)) for x, w, b in zip((q_in, k_in, v_in), ws, bs))
        elif q_in is k_in and k_in is v_in:
            form = "mha"
            proj = _call(g, F.linear, (q_in, a["in_proj_weight"], bias))
            chunks = _call(g, torch.chunk, (proj, 3, -1))
            q, k, v = (_call(g, operator.getitem, (chunks, i)) for i in range(3))
        else:
            form = "mha"
            wc = _call(g, torch.chunk, (a["in_proj_weight"], 3))
            ws = [_call(g, operator.getitem, (wc, i)) for i in range(3)]
            bs = [None] * 3
            if bias is not None:
                bc = _call(g, torch.chunk, (bias, 3))
                bs = [_call(g, operator.getitem, (bc, i)) for i in range(3)]
            q, k, v = (_call(g, F.linear, (x, w, b)) for x, w, b in zip((q_in, k_in, v_in), ws, bs))
        heads = []
        for t, length in ((q, L), (k, S), (v, S)):
            t = _call(g, torch.reshape, (t, (length, N, H, hd)))
            heads.append(_call(g, torch.permute, (t, (1, 2, 0, 3))))
        am, kpm = a["attn_mask"], a["key_padding_mask"]
        mask = None
        if am is not None:
            mask = _additive(g, am, dtype)
            if len(shape(am)) == 3:
                mask = _call(g, torch.reshape, (mask, (N, H, L, S)))
        if kpm is not None:
            pad = _call(g, torch.reshape, (_additive(g, kpm, dtype), (N, 1, 1, S)))
            mask = pad if mask is None else _call(g, torch.add, (mask, pad))
        kwargs = {} if mask is None else {"attn_mask": mask}
        o = _call(g, F.scaled_dot_product_attention, tuple(heads), kwargs, name="attention_mha")
        o.meta.setdefault("xdit", {})["canonical"] = "mha"
        o = _call(g, torch.permute, (o, (2, 0, 1, 3)))
        o = _call(g, torch.reshape, (o, (L, N, E)))
        out = _call(g, F.linear, (o, a["out_proj_weight"], a["out_proj_bias"]))
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        g.erase_node(u)
    g.erase_node(node)
    return form


def canonical_mha(gm: fx.GraphModule) -> dict[str, int]:
    """Decompose every ``multi_head_attention_forward`` call that can be; counts per form."""
    counts: dict[str, int] = {}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
            continue
        a = _bind(node)
        why = "arguments not understood" if a is None else _why_not(node, a)
        if why is not None:
            node.meta.setdefault("xdit", {})["why_replicated"] = f"multi_head_attention_forward left as written: {why}"
            key = f"left:mha ({why})"
        else:
            key = "attention:" + _rewrite(gm, node, a)
            changed = True
        counts[key] = counts.get(key, 0) + 1
    if changed:
        eliminate_dead_code(gm.graph)
        gm.recompile()
    return counts
