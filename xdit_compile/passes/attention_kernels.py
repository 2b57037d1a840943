"""Rewrite calls of attention kernels (flash-attn, xformers, your own) into SDPA.

Models that call an attention kernel directly reach the graph as one opaque custom op that no
rule knows, so the attention ran replicated. An open registry maps each kernel to an *adapter*
that reads the call as SDPA: which arguments are q, k and v and in which layout, the mask, the
scale, causality and which output is the attention. This pass rewrites every registered call
into ``F.scaled_dot_product_attention`` with transposes around it, so ``recognise``, the
attention rule and ``lower`` give it Ulysses, Ring or USP. Before/after (flash-attn)::

    r = torch.ops.flash_attn._flash_attn_forward(     |  qh = q.transpose(1, 2)   # [B, H, S, D]; k, v alike
            q, k, v, 0.0, 0.125, causal=False, ...)   |  o = scaled_dot_product_attention(qh, kh, vh, scale=0.125)
    o = r[0]                      # [B, S, H, D]      |  o = o.transpose(1, 2)    # [B, S, H, D]

Built in (flash-attn >= 2.6 registers torch custom ops, which Dynamo keeps in the graph when it
inlines ``FlashAttnFunc.forward``; xformers calls its flash op, or ATen's CUTLASS kernel when
``attn_bias`` is a tensor):

    ``flash_attn::_flash_attn_forward``         q, k, v [B, S, H, D]
    ``flash_attn::_flash_attn_varlen_forward``  q, k, v [T, H, D] packed, ``cu_seqlens_q/k``
    ``xformers_flash::flash_fwd``               [B, M, H, K], or packed with ``cu_seqlens``
    ``aten::_efficient_attention_forward``      [B, M, H, K], additive ``bias`` [B, H, M, N]

and the Python functions ``flash_attn.flash_attn_func`` / ``flash_attn_varlen_func`` when a
user keeps them whole with ``torch._dynamo.allow_in_graph``. Packed (varlen) calls are rewritten
when ``cu_seqlens`` is computed in the graph from constants and splits the tokens into equal
sequences (the tokens become [B, S, H, D]); sequences of different lengths, or lengths known
only at run time, are left as written.

Left as written (runs replicated; the reason goes to the report and to the call's
``meta["xdit"]["why_replicated"]``): dropout, sliding windows, softcap, ALiBi slopes, returned
probabilities or log-sum-exp read by the graph, fewer K/V heads than Q heads (GQA), bottom-right
causal masks with Sq != Sk, symbolic shapes, and whatever an adapter refuses.

Reads: ``node.meta["val"]`` / ``["example_value"]``. Writes: the new nodes' fake values,
``meta["xdit"]["canonical"]`` (the form, e.g. ``"flash_attn"``) on each new SDPA node; returns the
count per ``"attention:<form>"`` and ``"left:<form> (<reason>)"``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph import eliminate_dead_code, has_side_effects, has_symbolic_shape, is_tensor, op_name, shape, value
from .canonical_attention import _call

LAYOUTS = ("bshd", "bhsd", "thd")


@dataclass(frozen=True)
class KernelCall:
    """One kernel call read as SDPA; an adapter's answer.

    ``layout``: ``"bshd"`` ([B, S, H, D], flash-attn and xformers), ``"bhsd"`` (SDPA's own) or
    ``"thd"`` (tokens of all sequences packed, [T, H, D], with ``cu_seqlens_q`` / ``cu_seqlens_k``).
    The output is given back in the same layout. ``mask``: SDPA's ``attn_mask`` (boolean keep or
    additive float, broadcastable to [B, H, Sq, Sk]). ``scale``: ``None`` means 1/sqrt(D).
    ``causal``: SDPA's top-left aligned causal mask. ``output``: the index of the attention output
    in the call's result tuple, ``None`` if the call returns the output itself.
    """

    q: fx.Node
    k: fx.Node
    v: fx.Node
    layout: str = "bshd"
    mask: fx.Node | None = None
    scale: float | None = None
    causal: bool = False
    output: int | None = 0
    cu_seqlens_q: fx.Node | None = None
    cu_seqlens_k: fx.Node | None = None


# ``adapter(node, args)``: ``args`` are the call's arguments by name (defaults filled in from the
# op schema or the function's signature). Return a ``KernelCall``, or a string saying why the
# call cannot be read as SDPA (it then runs replicated and the report gives the string).
Adapter = Callable[[fx.Node, dict[str, Any]], Union[KernelCall, str]]
Target = Union[str, Callable[..., Any], "torch._ops.OpOverload", "torch._ops.OpOverloadPacket"]


@dataclass(frozen=True)
class _Entry:
    adapter: Adapter
    form: str


_REGISTRY: dict[str, _Entry] = {}


def _key(target: Any) -> str | None:
    """``"namespace::op"`` for torch ops (any spelling), ``"module.qualname"`` for Python functions."""
    if isinstance(target, str):
        if target.startswith("torch.ops."):  # torch.ops.ns.op[.overload]
            ns, _, name = target.removeprefix("torch.ops.").partition(".")
            return f"{ns}::{name.split('.')[0]}"
        if "::" in target:
            ns, _, name = target.partition("::")
            return f"{ns}::{name.split('.')[0]}"
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else None


def register_attention_kernel(target: Target, adapter: Adapter, form: str | None = None) -> None:
    """Read calls of ``target`` as attention: ``adapter`` maps a call to a ``KernelCall``.

    ``target``: a torch op (``torch.ops.ns.op``, one of its overloads, or the string
    ``"ns::op"``), or a Python function kept whole in the graph (the function, or
    ``"module.qualname"``). ``form``: the name the plan report gives such calls (default: the
    op's name). Registering a target again replaces its adapter.
    """
    key = _key(target)
    if key is None:
        raise TypeError(f"register_attention_kernel: cannot name target {target!r}; pass a torch op, "
                        "a 'namespace::op' string or a Python function")
    _REGISTRY[key] = _Entry(adapter, form or key.split("::")[-1].split(".")[-1].lstrip("_"))


def registered_attention_kernels() -> list[str]:
    """The names of every registered kernel target."""
    return sorted(_REGISTRY)


def _lookup(node: fx.Node) -> _Entry | None:
    if node.op != "call_function":
        return None
    key = _key(node.target)
    return _REGISTRY.get(key) if key else None


def _bind(node: fx.Node) -> dict[str, Any] | None:
    """The call's arguments by name, defaults included."""
    t = node.target
    if isinstance(t, torch._ops.OpOverloadPacket):
        names = t.overloads()
        t = getattr(t, "default") if "default" in names else (getattr(t, names[0]) if len(names) == 1 else None)
    if isinstance(t, torch._ops.OpOverload):
        out: dict[str, Any] = {}
        schema = t._schema.arguments
        if len(node.args) > len(schema):
            return None
        for i, a in enumerate(schema):
            if i < len(node.args):
                out[a.name] = node.args[i]
            elif a.name in node.kwargs:
                out[a.name] = node.kwargs[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
            else:
                return None
        return out
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


# ------------------------------------------------------------------ built-in adapters
def _flash_extras(a: dict[str, Any], window: tuple[Any, Any], return_key: str) -> str | None:
    if a.get("dropout_p", 0.0):
        return "dropout_p > 0 draws random numbers"
    if tuple(window) != (-1, -1):
        return f"sliding window {tuple(window)}"
    if a.get("softcap", 0.0):
        return "softcap"
    if a.get("alibi_slopes") is not None:
        return "ALiBi slopes"
    if a.get(return_key):
        return "returns the attention probabilities"
    for extra in ("block_table", "leftpad_k", "seqused_k"):
        if a.get(extra) is not None:
            return f"{extra} (paged or padded keys)"
    return None


def _bottom_right(causal: bool, q: Any, k: Any, seq_dim: int) -> str | None:
    if causal and is_tensor(q) and is_tensor(k) and shape(q)[seq_dim] != shape(k)[seq_dim]:
        return "causal with Sq != Sk is aligned bottom-right (SDPA's is top-left)"
    return None


def flash_attn_adapter(node: fx.Node, a: dict[str, Any]) -> KernelCall | str:
    """``flash_attn::_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, ...)``."""
    why = _flash_extras(a, (a.get("window_size_left", -1), a.get("window_size_right", -1)), "return_softmax")
    why = why or _bottom_right(bool(a["causal"]), a["q"], a["k"], 1)
    if why:
        return why
    return KernelCall(a["q"], a["k"], a["v"], "bshd", scale=a["softmax_scale"], causal=bool(a["causal"]), output=0)


def flash_attn_varlen_adapter(node: fx.Node, a: dict[str, Any]) -> KernelCall | str:
    """``flash_attn::_flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)``."""
    why = _flash_extras(a, (a.get("window_size_left", -1), a.get("window_size_right", -1)), "return_softmax")
    if why:
        return why
    return KernelCall(a["q"], a["k"], a["v"], "thd", scale=a["softmax_scale"], causal=bool(a["causal"]), output=0,
                      cu_seqlens_q=a["cu_seqlens_q"], cu_seqlens_k=a["cu_seqlens_k"])


def xformers_flash_adapter(node: fx.Node, a: dict[str, Any]) -> KernelCall | str:
    """``xformers_flash::flash_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, seqused_k, ...)``."""
    if a["p"]:
        return "dropout p > 0 draws random numbers"
    if (a["window_left"], a["window_right"]) != (-1, -1):
        return f"sliding window {(a['window_left'], a['window_right'])}"
    if a["return_softmax"] or a["block_tables"] is not None or a["seqused_k"] is not None:
        return "returned probabilities, paged or padded keys"
    packed = a["cu_seqlens_q"] is not None
    why = None if packed else _bottom_right(bool(a["is_causal"]), a["query"], a["key"], 1)
    if why:
        return why
    return KernelCall(a["query"], a["key"], a["value"], "thd" if packed else "bshd", scale=a["softmax_scale"],
                      causal=bool(a["is_causal"]), output=0, cu_seqlens_q=a["cu_seqlens_q"],
                      cu_seqlens_k=a["cu_seqlens_k"])


def efficient_attention_adapter(node: fx.Node, a: dict[str, Any]) -> KernelCall | str:
    """``aten::_efficient_attention_forward(query, key, value, bias, cu_seqlens_q, ...)`` (xformers' CUTLASS path)."""
    if a["dropout_p"]:
        return "dropout_p > 0 draws random numbers"
    if a["cu_seqlens_q"] is not None or a["seqlen_k"] is not None or a["window_size"] is not None:
        return "packed sequences, padded keys or a window"
    if a["custom_mask_type"] not in (0, 1):
        return "a bottom-right causal mask"
    bias = a["bias"]
    if bias is not None and not (is_tensor(bias) and value(bias).dtype == value(a["query"]).dtype):
        return "a bias of another dtype than the query"
    return KernelCall(a["query"], a["key"], a["value"], "bshd", mask=bias, scale=a["scale"],
                      causal=a["custom_mask_type"] == 1, output=0)


def _flash_attn_func_adapter(node: fx.Node, a: dict[str, Any]) -> KernelCall | str:
    why = _flash_extras(a, a["window_size"], "return_attn_probs") or _bottom_right(bool(a["causal"]), a["q"], a["k"], 1)
    if why:
        return why
    return KernelCall(a["q"], a["k"], a["v"], "bshd", scale=a["softmax_scale"], causal=bool(a["causal"]), output=None)


def _flash_attn_varlen_func_adapter(node: fx.Node, a: dict[str, Any]) -> KernelCall | str:
    why = _flash_extras(a, a["window_size"], "return_attn_probs")
    if why:
        return why
    return KernelCall(a["q"], a["k"], a["v"], "thd", scale=a["softmax_scale"], causal=bool(a["causal"]), output=None,
                      cu_seqlens_q=a["cu_seqlens_q"], cu_seqlens_k=a["cu_seqlens_k"])


register_attention_kernel("flash_attn::_flash_attn_forward", flash_attn_adapter, "flash_attn")
register_attention_kernel("flash_attn::_flash_attn_varlen_forward", flash_attn_varlen_adapter, "flash_attn_varlen")
register_attention_kernel("xformers_flash::flash_fwd", xformers_flash_adapter, "xformers_flash")
register_attention_kernel("aten::_efficient_attention_forward", efficient_attention_adapter, "xformers_cutlass")
for _mod in ("flash_attn", "flash_attn.flash_attn_interface"):
    register_attention_kernel(f"{_mod}.flash_attn_func", _flash_attn_func_adapter, "flash_attn")
    register_attention_kernel(f"{_mod}.flash_attn_varlen_func", _flash_attn_varlen_func_adapter, "flash_attn_varlen")


# ------------------------------------------------------------------ the pass
def _constant(node: Any, depth: int = 16) -> Any:
    """The value of ``node`` if it is computed from constants only (e.g. ``torch.arange``), else None."""
    if not isinstance(node, fx.Node):
        return node
    if depth == 0 or node.op not in ("call_function", "call_method") or has_side_effects(node):
        return None
    missing = []

    def get(n: fx.Node) -> Any:
        v = _constant(n, depth - 1)
        if v is None:
            missing.append(n)
        return v

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), get)
    if missing:
        return None
    try:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not computable here: treated as not constant
        return None


def _uniform_length(call: KernelCall) -> tuple[int, int] | str:
    """(sequences, tokens per sequence) if both ``cu_seqlens`` split the tokens equally and alike."""
    lengths = []
    for cu, t in ((call.cu_seqlens_q, call.q), (call.cu_seqlens_k, call.k)):
        c = _constant(cu)
        if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.numel() < 2:
            return "cu_seqlens known only at run time (sequence lengths may vary)"
        b, total = c.numel() - 1, shape(t)[0]
        if total % b or not torch.equal(c.long().cpu(), torch.arange(0, total + 1, total // b)):
            return f"sequences of different lengths ({c.tolist()})"
        lengths.append((b, total // b))
    if lengths[0][0] != lengths[1][0]:
        return "cu_seqlens_q and cu_seqlens_k count different sequences"
    if lengths[0][1] != lengths[1][1] and call.causal:
        return "causal with Sq != Sk is aligned bottom-right (SDPA's is top-left)"
    return lengths[0][0], lengths[0][1]


def _check(node: fx.Node, call: KernelCall) -> str | None:
    if call.layout not in LAYOUTS:
        return f"adapter gave layout {call.layout!r}, not one of {LAYOUTS}"
    nodes = [call.q, call.k, call.v] + ([call.mask] if call.mask is not None else [])
    if not all(isinstance(t, fx.Node) and is_tensor(t) for t in nodes):
        return "q, k, v or the mask is not a tensor of this graph"
    if any(has_symbolic_shape(t) for t in nodes):
        return "symbolic shapes"
    nd = 3 if call.layout == "thd" else 4
    if any(len(shape(t)) != nd for t in (call.q, call.k, call.v)):
        return f"q, k, v are not {nd}-d as layout {call.layout!r} says"
    dtypes = {value(t).dtype for t in (call.q, call.k, call.v)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return "q, k, v differ in dtype"
    head = {"bshd": -2, "bhsd": -3, "thd": -2}[call.layout]
    if not shape(call.q)[head] == shape(call.k)[head] == shape(call.v)[head]:
        return "fewer K/V heads than query heads (GQA)"
    out = _output_value(node, call)
    if not isinstance(out, torch.Tensor) or out.dtype != value(call.q).dtype:
        return "the kernel's output is not a tensor of the inputs' dtype"
    if call.output is None:
        return None
    for u in node.users:
        if op_name(u) != "getitem" or (u.args[1] != call.output and u.users):
            return "the graph reads another output of the kernel (log-sum-exp, probabilities)"
    return None


def _rewrite(gm: fx.GraphModule, node: fx.Node, call: KernelCall, form: str) -> str | None:
    g = gm.graph
    packed = None
    if call.layout == "thd":
        packed = _uniform_length(call)
        if isinstance(packed, str):
            return packed
    with g.inserting_before(node):
        q, k, v = call.q, call.k, call.v
        if packed is not None:
            b = packed[0]
            q, k, v = (_call(g, torch.reshape, (t, (b, shape(t)[0] // b, *shape(t)[1:]))) for t in (q, k, v))
        if call.layout != "bhsd":
            q, k, v = (_call(g, torch.transpose, (t, 1, 2)) for t in (q, k, v))
        kwargs: dict[str, Any] = {}
        if call.mask is not None:
            kwargs["attn_mask"] = call.mask
        if call.causal:
            kwargs["is_causal"] = True
        if call.scale is not None:
            kwargs["scale"] = float(call.scale)
        o = _call(g, F.scaled_dot_product_attention, (q, k, v), kwargs, name=f"attention_{form}")
        o.meta.setdefault("xdit", {})["canonical"] = form
        if call.layout != "bhsd":
            o = _call(g, torch.transpose, (o, 1, 2))
        if packed is not None:
            o = _call(g, torch.reshape, (o, (shape(call.q)[0], *shape(o)[2:])))
    if call.output is None:
        node.replace_all_uses_with(o)
    else:
        for u in list(node.users):
            if u.args[1] == call.output:
                u.replace_all_uses_with(o)
            g.erase_node(u)
    g.erase_node(node)
    return None


def _output_value(node: fx.Node, call: KernelCall) -> Any:
    out = value(node)
    if call.output is None:
        return out
    return out[call.output] if isinstance(out, (tuple, list)) and call.output < len(out) else None


def attention_kernels(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite every registered attention-kernel call into SDPA; counts per form."""
    counts: dict[str, int] = {}
    changed = False
    for node in list(gm.graph.nodes):
        entry = _lookup(node)
        if entry is None:
            continue
        args = _bind(node)
        call = "its arguments do not match the registered signature" if args is None else entry.adapter(node, args)
        why = call if isinstance(call, str) else _check(node, call)
        if why is None:
            why = _rewrite(gm, node, call, entry.form)  # type: ignore[arg-type]
        if why is None:
            key = f"attention:{entry.form}"
            changed = True
        else:
            node.meta.setdefault("xdit", {})["why_replicated"] = f"attention kernel {entry.form} left as written: {why}"
            key = f"left:{entry.form} ({why})"
        counts[key] = counts.get(key, 0) + 1
    if changed:
        eliminate_dead_code(gm.graph)
        gm.recompile()
    return counts
