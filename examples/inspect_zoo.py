"""Inspect how tiny zoo models look to a torch.compile backend.

    python examples/inspect_zoo.py [-v] [names...]

``names`` come from ``tiny_dits.ZOO`` and ``tiny_dits_more.ZOO_MORE`` (default: every model in both).
For each model it checks

* eager forward works (and is deterministic from the seed), and its time;
* ``torch.compile(model, backend=<recording backend returning gm.forward>, fullgraph=False)``: output vs
  eager (max abs diff), number of FX graphs Dynamo produced (graph breaks = graphs - 1);
* ``fullgraph=True``: whether it traces, and output vs eager;
* in the captured graphs: how attention appears (``F.scaled_dot_product_attention`` positional or keyword,
  masks, GQA, Q/K lengths), which norms (layer_norm / rms_norm / decomposed RMSNorm pow-mean-rsqrt /
  group_norm), how patch embedding appears (conv with stride == kernel, or linear on packed tokens, possibly
  after reshape/permute), how RoPE appears (``view_as_complex``, real unbind/stack or rotate-half rotations,
  gathered cos/sin tables) and unusual ops (``nonzero``, ``.item()``, in-place setitem, MoE routing ...).

It prints one summary line per model (``-v`` adds graph-break reasons and every SDPA call).
"""

from __future__ import annotations

import argparse
import operator
import os
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from typing import Any

import torch
import torch.fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from tiny_dits import ZOO, make
    from tiny_dits_more import ZOO_MORE, make_more
except ImportError:  # pragma: no cover - imported as examples.inspect_zoo
    from examples.tiny_dits import ZOO, make
    from examples.tiny_dits_more import ZOO_MORE, make_more


def build(name: str, batch: int = 2, seed: int = 0):
    if name in ZOO:
        return make(name, batch, seed)
    if name in ZOO_MORE:
        return make_more(name, batch, seed)
    raise KeyError(f"unknown model {name!r}; known: {sorted(ZOO) + sorted(ZOO_MORE)}")


def attention_kind(name: str) -> str:
    return (ZOO.get(name) or ZOO_MORE[name]).attention


def first_tensor(out: Any) -> torch.Tensor:
    """The model's sample as one tensor (a per-sample list, as Z-Image returns, is stacked)."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return first_tensor(out.sample)
    if isinstance(out, list) and out and all(torch.is_tensor(t) for t in out):
        return torch.stack(out)
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    raise TypeError(type(out))


# ----------------------------------------------------------------------------------------------------- graph ops
def op_name(node: torch.fx.Node) -> str:
    """A short, stable name for a node's operation ('' for placeholders/outputs)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        if t is operator.setitem:
            return "setitem"
        if t is operator.getitem:
            return "getitem"
        name = getattr(t, "__name__", str(t))
        return name
    if node.op == "call_module":
        return f"module:{node.target}"
    return ""


def meta_val(node: Any) -> Any:
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def shape_of(node: Any) -> tuple | None:
    v = meta_val(node)
    if torch.is_tensor(v):
        return tuple(int(s) if isinstance(s, int) else str(s) for s in v.shape)
    return None


SDPA_NAMES = {"scaled_dot_product_attention"}
VIEW_LIKE = {
    "view", "reshape", "permute", "flatten", "unflatten", "transpose", "contiguous", "unfold", "to", "type",
    "float", "squeeze", "unsqueeze", "getitem", "chunk", "split", "movedim", "einsum", "pad", "cat", "concat",
}


def sdpa_calls(gm: torch.fx.GraphModule) -> list[dict]:
    calls = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_name(n) in SDPA_NAMES:
            pos = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
            a = dict(zip(pos, n.args))
            a.update(n.kwargs)
            mask = a.get("attn_mask")
            q, k = shape_of(a.get("query")), shape_of(a.get("key"))
            mval = meta_val(mask) if isinstance(mask, torch.fx.Node) else None
            scale = a.get("scale")
            calls.append({
                "style": "pos" if len(n.args) >= 3 else ("kw" if not n.args else f"mixed{len(n.args)}"),
                "scale": None if scale is None else (round(scale, 4) if isinstance(scale, float) else str(scale)),
                "kv_repeat": _kv_repeat(a.get("key")),
                "q": q, "k": k,
                "mask": None if mask is None else (shape_of(mask), str(mval.dtype).replace("torch.", "") if torch.is_tensor(mval) else "?"),
                "gqa": bool(a.get("enable_gqa", False)) or (q is not None and k is not None and q[1] != k[1]),
                "causal": a.get("is_causal", False),
            })
    return calls


LATENT_INPUT = re.compile(r"^l_(kwargs_)?(hidden_states|x|x_0|sample)_$")


def _kv_repeat(node: Any, depth: int = 4) -> bool:
    """Whether K reaches SDPA through a repeat/expand of its head axis (GQA done by hand)."""
    if not isinstance(node, torch.fx.Node) or depth == 0:
        return False
    if op_name(node) in ("repeat", "repeat_interleave", "expand"):
        return True
    return any(_kv_repeat(a, depth - 1) for a in node.args if isinstance(a, torch.fx.Node))


def _strided_getitem(graphs: list[torch.fx.GraphModule]) -> int:
    """How many ``x[..., 0::2]``-style reads (interleaved RoPE pairs) the graphs hold."""
    count = 0
    for gm in graphs:
        for n in gm.graph.nodes:
            if op_name(n) == "getitem" and len(n.args) > 1:
                idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
                count += any(isinstance(i, slice) and i.step not in (None, 1) for i in idx)
    return count


def _setitem_kinds(graphs: list[torch.fx.GraphModule]) -> set[str]:
    kinds = set()
    for gm in graphs:
        for n in gm.graph.nodes:
            if op_name(n) == "setitem":
                idx = n.args[1]
                idx = idx if isinstance(idx, tuple) else (idx,)
                if any(isinstance(i, slice) and i.step not in (None, 1) for i in idx):
                    kinds.add("strided")
                elif any(isinstance(i, slice) for i in idx):
                    kinds.add("slice")
                else:
                    kinds.add("other")
    return kinds


def patch_embed(gm: torch.fx.GraphModule) -> str:
    """How the (first) latent input reaches its first weighted op."""
    convs = []
    for n in gm.graph.nodes:
        if op_name(n) in ("conv2d", "conv3d", "conv1d"):
            w = shape_of(n.args[1]) if len(n.args) > 1 else None
            stride = n.args[3] if len(n.args) > 3 else n.kwargs.get("stride", 1)
            k = tuple(w[2:]) if w else None
            s = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * (len(k) if k else 1)
            convs.append(f"{op_name(n)}(k={k},s={s}{',k==s' if k == s else ''})")
    # follow the hidden_states input through view-like ops to the first weighted consumer
    start = None
    for n in gm.graph.nodes:
        if n.op == "placeholder" and LATENT_INPUT.match(n.name):
            start = n
            break
    route = ""
    if start is not None:
        frontier, seen, chain = [start], set(), []
        while frontier:
            cur = frontier.pop(0)
            for u in cur.users:
                if u in seen:
                    continue
                seen.add(u)
                nm = op_name(u)
                if nm in ("linear", "conv2d", "conv3d", "conv1d", "matmul") and (not route or "<graph" in route):
                    route = "->".join(dict.fromkeys(chain + [nm]))
                    frontier = []
                    break
                if nm in VIEW_LIKE:
                    chain.append(nm)
                    frontier.append(u)
                elif u.op == "output" and not route:
                    route = "->".join(dict.fromkeys(chain + ["<graph break>"]))
        if not route:
            route = "?"
    return ";".join(dict.fromkeys(convs)) + (f" [{start.name}:{route}]" if start is not None else "")


def norms(ops: Counter) -> str:
    out = []
    if ops["layer_norm"]:
        out.append(f"layer_norm×{ops['layer_norm']}")
    if ops["rms_norm"]:
        out.append(f"rms_norm×{ops['rms_norm']}")
    if ops["group_norm"]:
        out.append(f"group_norm×{ops['group_norm']}")
    if ops["rsqrt"]:
        out.append(f"decomposed-rms(rsqrt)×{ops['rsqrt']}")
    return ",".join(out) or "none"


def rope(ops: Counter, setitems: set[str], strided_reads: int = 0) -> str:
    """A hint, not a proof: which rotation idioms occur in the graphs."""
    out = []
    if strided_reads and ops["stack"]:
        out.append(f"real strided reads(x[...,0::2])+stack×{strided_reads}")
    if "strided" in setitems and ops["unbind"]:
        out.append("real strided setitem(out[...,0::2]=...)")
    if ops["view_as_complex"]:
        out.append(f"complex(view_as_complex×{ops['view_as_complex']})")
    if ops["polar"]:
        out.append("polar")
    if ops["unbind"] and ops["stack"] and ops["neg"]:
        out.append("real unbind/stack")
    elif ops["neg"] and ops["cat"]:
        out.append("real rotate-half(neg+cat)")
    elif ops["neg"] and ops["stack"]:
        out.append("neg+stack (rotation-matrix?)")
    if ops["embedding"] and (ops["cos"] == 0):
        out.append("gathered cos/sin(embedding)")
    if ops["cos"] or ops["sin"]:
        out.append(f"cos/sin in graph×{ops['cos']}")
    return ",".join(out) or "none"


ODD = [
    "nonzero", "item", "tolist", "argsort", "sort", "topk", "bincount", "cumsum", "masked_select", "setitem",
    "index_put", "index_put_", "scatter_reduce_", "scatter", "scatter_reduce", "repeat_interleave", "einsum",
    "numpy", "cpu", "unique", "where", "masked_fill", "masked_fill_", "copy_", "fill_", "max", "baddbmm",
    "softmax", "bmm", "matmul", "embedding", "max_pool3d", "new_zeros", "cartesian_prod", "topk",
]


def oddities(ops: Counter) -> str:
    odd = {k: ops[k] for k in dict.fromkeys(ODD) if ops[k]}
    inplace = {k: v for k, v in ops.items() if k.endswith("_") and not k.startswith("_") and k not in odd}
    odd.update(inplace)
    return ",".join(f"{k}×{v}" for k, v in odd.items()) or "-"


# ----------------------------------------------------------------------------------------------------- checks
def inspect_model(name: str) -> dict:
    warnings.filterwarnings("ignore")
    r: dict[str, Any] = {"name": name, "attention": attention_kind(name)}
    model, inputs = build(name)
    with torch.no_grad():
        ref = first_tensor(model(**inputs))
        for _ in range(5):  # warm-up: the first CPU calls are 10-100x slower
            model(**inputs)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            again = first_tensor(model(**inputs))
            ts.append(time.perf_counter() - t0)
        m2, in2 = build(name)
        r["deterministic"] = bool(torch.equal(first_tensor(m2(**in2)), ref)) and bool(torch.equal(again, ref))
    r["eager_ms"] = min(ts) * 1000  # best of 5: the machine is shared
    r["out_shape"] = tuple(ref.shape)

    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(model, backend=record, fullgraph=False)
    with torch.no_grad():
        out = first_tensor(compiled(**inputs))
    r["graphs"] = len(graphs)
    r["diff"] = (out - ref).abs().max().item()
    r["breaks"] = dict(counters["graph_break"])

    full_graphs: list[torch.fx.GraphModule] = []

    def record_full(gm, example_inputs):
        full_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            outf = first_tensor(torch.compile(model, backend=record_full, fullgraph=True)(**inputs))
        r["fullgraph"] = f"ok(diff={(outf - ref).abs().max().item():.1e})"
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        r["fullgraph"] = f"FAIL {type(e).__name__}: {msg[:160]}"
    torch._dynamo.reset()

    r["sdpa_nofull"] = sum(len(sdpa_calls(gm)) for gm in graphs)
    # describe the model from the single full graph when there is one, else from the partial graphs
    use = full_graphs if r["fullgraph"].startswith("ok") and full_graphs else graphs
    r["analysed"] = "fullgraph" if use is full_graphs else "partial"
    r.update(analyse(use))
    return r


def analyse(graphs: list[torch.fx.GraphModule]) -> dict:
    r: dict[str, Any] = {}
    ops: Counter = Counter()
    calls = []
    for gm in graphs:
        ops.update(op_name(n) for n in gm.graph.nodes)
        calls += sdpa_calls(gm)
    r["ops"] = ops
    r["sdpa"] = calls
    styles = Counter(c["style"] for c in calls)
    r["sdpa_style"] = ",".join(f"{k}×{v}" for k, v in styles.items()) or "none"
    masks = Counter(f"{c['mask'][0]}:{c['mask'][1]}" for c in calls if c["mask"])
    r["masks"] = ",".join(f"{k}×{v}" for k, v in masks.items()) or "none"
    r["gqa"] = "enable_gqa/Hk<Hq" if any(c["gqa"] for c in calls) else (
        "manual kv repeat" if any(c["kv_repeat"] for c in calls) else "no")
    scales = Counter(str(c["scale"]) for c in calls if c["scale"] is not None)
    r["scales"] = ",".join(f"{k}×{v}" for k, v in scales.items()) or "default"
    qk = Counter(f"{c['q'][2] if c['q'] else '?'}/{c['k'][2] if c['k'] else '?'}" for c in calls)
    r["qk_len"] = ",".join(f"{k}×{v}" for k, v in qk.items())
    r["norms"] = norms(ops)
    r["rope"] = rope(ops, _setitem_kinds(graphs), _strided_getitem(graphs))
    r["setitem"] = ",".join(sorted(_setitem_kinds(graphs)))
    r["patch"] = patch_embed(graphs[0]) if graphs else "?"
    r["odd"] = oddities(ops)
    return r


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:14s} ERROR {r['error']}"
    return (
        f"{r['name']:14s} attn={r['attention']:15s} eager={r['eager_ms']:.1f}ms det={r['deterministic']} "
        f"graphs={r['graphs']} diff={r['diff']:.1e} fullgraph={r['fullgraph']} | [{r['analysed']}] "
        f"sdpa={r['sdpa_style']} (partial graphs: {r['sdpa_nofull']}) "
        f"q/k={r['qk_len']} masks={r['masks']} gqa={r['gqa']} scale={r['scales']} | norms={r['norms']} | patch={r['patch']} | "
        f"rope={r['rope']} | odd={r['odd']}{' setitem:' + r['setitem'] if r['setitem'] else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    names = args.names or list(ZOO) + list(ZOO_MORE)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    bad = 0
    for name in names:
        try:
            r = inspect_model(name)
        except Exception as e:  # noqa: BLE001
            r = {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if args.verbose:
                traceback.print_exc()
            bad += 1
        print(summary_line(r), flush=True)
        if args.verbose and "error" not in r:
            for reason, n in r["breaks"].items():
                print(f"    break×{n}: {reason[:300]}")
            for c in r["sdpa"]:
                print(f"    sdpa {c}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
