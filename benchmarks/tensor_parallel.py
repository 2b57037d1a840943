"""Tensor parallel side by side: 1 rank, TP 2, Ulysses 2, TP 2 x Ulysses 2, and diffusers' ``_tp_plan``.

    python benchmarks/tensor_parallel.py            # Flux-like, hidden 1,024, 2 + 2 blocks (a few minutes on 2 cores)
    python benchmarks/tensor_parallel.py --quick    # tiny shapes, 1 + 1 blocks (the CI smoke test)

One Flux-like ``FluxTransformer2DModel`` (random weights, float32, batch 1) at a shape where the
weights dominate the memory: hidden 1,024 = 8 heads x 128, 256 image tokens + 64 text tokens,
2 double + 2 single blocks (~0.5 GB of parameters; the activations of one forward are ~50 MB).
Two sets of processes (gloo on CPU; nccl, one GPU per rank, when enough GPUs are visible):

* 2 processes: 1 rank (rank 0 alone, the other waits at a barrier), TP 2, Ulysses 2 and diffusers'
  ``_tp_plan`` (TP 2), each with its own copy of the model (same seed, same weights);
* 4 processes: 1 rank again and TP 2 x Ulysses 2 (4 processes on 2 cores: they share the cores).

Per configuration and rank:

* **parameters kept**: bytes of the parameters and buffers the rank holds after compiling: a
  parameter whose storage xdit freed counts its kept slices (``tensor_parallel.kept_slices``); a
  DTensor parameter (diffusers) its local shard. Counted from the tensors, not from the resident
  set (several models share one process here).
* **forward peak**: CPU: the high-water mark of the resident set during one forward above the
  resident set before it (``/proc/self/clear_refs`` + VmHWM, after ``malloc_trim``;
  ``benchmarks.jobs._memory_probe``); CUDA: ``torch.cuda.max_memory_allocated`` above the memory
  allocated before. **Peak per rank** = parameters kept + forward peak.
* **latency**: median of ``--iters`` (>= 5) calls; the configurations of a set alternate call by
  call (round i runs each once, each call after a barrier), so load from other processes hits
  them alike.
* **bytes moved** per forward: handed to collectives (``record_collectives()``; diffusers'
  DTensor collectives by a dispatch mode), against the minimum: TP T alone, Megatron's one
  all-reduce of each attention's and each feed-forward's output per block (the row-parallel
  outputs of the plan below); Ulysses U, ``benchmarks.analytic.minimum``; TP T x Ulysses U, the
  same all-reduces on the token-sharded activation (/ U), the Ulysses all-to-alls of the local
  q, k, v and output ([B, H/T, S/U, D] each) and the output gathered over U ranks.

diffusers' ``_tp_plan`` (``model.enable_parallelism(config=TensorParallelConfig(tp_degree=2))``)
refuses CPU: its message is recorded. Its bytes are then derived from its plan (one all-reduce of
the whole output of every "rowwise" linear, per forward) and, to check that derivation, its plan is
applied as diffusers applies it after that check (``torch.distributed.tensor.parallel.
parallelize_module`` with diffusers' own styles, ``diffusers.hooks.tensor_parallel._styles``) on a
CPU mesh and measured like the others.

Writes ``benchmarks/results/tensor_parallel.md`` and ``tensor_parallel.json`` (``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

MIB = 2**20


# ---------------------------------------------------------------------------------- the model
def shape(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(heads=4, head_dim=16, side=8, text=8, joint_dim=32, pooled=32, double=1, single=1,
                    rope=(4, 6, 6), batch=1)
    return dict(heads=8, head_dim=128, side=16, text=64, joint_dim=4096, pooled=768, double=2, single=2,
                rope=(16, 56, 56), batch=1)


def build(quick: bool, device: str = "cpu", seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The Flux-like model (eval, float32, weights from ``seed``) and its inputs."""
    import torch
    from diffusers import FluxTransformer2DModel

    s = shape(quick)
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=s["double"], num_single_layers=s["single"],
        attention_head_dim=s["head_dim"], num_attention_heads=s["heads"], joint_attention_dim=s["joint_dim"],
        pooled_projection_dim=s["pooled"], axes_dims_rope=s["rope"],
    ).eval().to(device)
    g = torch.Generator().manual_seed(seed + 1)
    side, b = s["side"], s["batch"]
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    inputs = {
        "hidden_states": torch.randn(b, side * side, 64, generator=g),
        "encoder_hidden_states": torch.randn(b, s["text"], s["joint_dim"], generator=g),
        "pooled_projections": torch.randn(b, s["pooled"], generator=g),
        "timestep": torch.rand(b, generator=g),
        "img_ids": img_ids.reshape(side * side, 3),
        "txt_ids": torch.zeros(s["text"], 3),
    }
    return model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# ---------------------------------------------------------------------------------- sizes on one rank
def single_rank_sizes(model: Any, inputs: dict[str, Any]) -> dict[str, int]:
    """Bytes, on one rank, of what the minimum formulas need: the outputs of the rowwise linears of
    diffusers' plan (= Megatron's row-parallel outputs), q/k/v/out of every self/joint attention,
    and the model output."""
    import torch
    import torch.nn.functional as F
    from diffusers.hooks.tensor_parallel import _resolve_tp_plan

    rows: list[int] = []
    handles = []
    for block, plan in _resolve_tp_plan(model, model._tp_plan):
        for path, style in plan.items():
            if style == "colwise":
                continue
            mod = block.get_submodule(path)
            handles.append(mod.register_forward_hook(lambda _m, _a, o: rows.append(o.numel() * o.element_size())))
    attention = [0]

    class _Sdpa(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func is F.scaled_dot_product_attention:
                q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
                if q.shape[-2] == k.shape[-2]:
                    attention[0] += sum(t.numel() * t.element_size() for t in (q, k, v, out))
            return out

    with torch.no_grad(), _Sdpa():
        out = model(**inputs, return_dict=False)[0]
    for h in handles:
        h.remove()
    return {"rowwise": sum(rows), "attention": attention[0], "output": out.numel() * out.element_size()}


def minimum(cfg: dict[str, Any], sizes: dict[str, int]) -> float | None:
    """Bytes a rank must hand to collectives per forward (module docstring); None for one rank."""
    t, u = cfg.get("tp", 1), cfg.get("ulysses", 1)
    if t * u == 1:
        return None
    total = 0.0
    if t > 1:
        total += sizes["rowwise"] / u  # Megatron's all-reduces, on the token shard under Ulysses
    if u > 1:
        total += sizes["attention"] / (t * u) + sizes["output"] / u  # all-to-alls + the output gather
    return total


# ---------------------------------------------------------------------------------- what one rank runs
def _param_bytes(model: Any) -> int:
    """Bytes of parameters and buffers this rank holds (see the module docstring)."""
    from torch.distributed.tensor import DTensor

    from xdit_compile.tensor_parallel import kept_slices

    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, DTensor):
            loc = t.to_local()
            total += loc.numel() * loc.element_size()
        elif t.numel() and t.untyped_storage().nbytes() == 0:
            total += sum(s.numel() * s.element_size() for s in kept_slices(t))
        else:
            total += t.numel() * t.element_size()
    return total


def _diffusers_tp(model: Any, degree: int, dev: str) -> tuple[str, Any]:
    """Try diffusers' own entry point; on refusal apply its plan as it would (see the module doc)."""
    import torch.distributed as dist
    from diffusers import TensorParallelConfig
    from diffusers.hooks.tensor_parallel import _resolve_tp_plan, _styles
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    # First as a user would call it; on CPU diffusers computes ``rank % torch.accelerator.device_count()``
    # (0 devices: ZeroDivisionError), so a second try reports one device (``jobs._patch_device_count``)
    # to reach its own device check.
    refusals = []
    for attempt in range(2):
        if attempt:
            from benchmarks.jobs import _patch_device_count

            _patch_device_count()
            model._parallel_config = None  # the failed try recorded its config before refusing
        try:
            model.enable_parallelism(config=TensorParallelConfig(tp_degree=degree))
            return "ran (enable_parallelism)", model
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            refusals.append(f"{type(e).__name__}: {e}")
    refusal = " / then, with one device reported: ".join(refusals)
    if dist.get_world_size() != degree:
        return refusal, None
    # The same calls apply_tensor_parallel makes after its device check, on this device's mesh.
    mesh = init_device_mesh(dev.split(":")[0], (degree,))
    for block, plan in _resolve_tp_plan(model, model._tp_plan):
        parallelize_module(block, mesh, _styles(plan))
    return refusal, model


def bench_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One set of processes: build every configuration, compile, count, probe memory, then time
    them alternating. Returns per configuration: times, bytes, memory, error vs one rank (rank 0)."""
    import torch
    import torch.distributed as dist

    from benchmarks import jobs
    from xdit_compile.runtime.collectives import record_collectives

    rank = dist.get_rank()
    dev = jobs.device()
    configs: list[dict[str, Any]] = spec["configs"]
    calls: dict[str, Callable[[], Any] | None] = {}
    res: dict[str, dict[str, Any]] = {c["name"]: {"name": c["name"], "world": c.get("tp", 1) * c.get("ulysses", 1)}
                                      for c in configs}
    ref = None
    sizes = None
    for cfg in configs:
        name = cfg["name"]
        r = res[name]
        kind = cfg["kind"]
        if kind == "solo" and rank != 0:
            calls[name] = None
            jobs._barrier()  # the one rank 0 passes after its solo run
            continue
        model, inputs = build(spec["quick"], dev)
        if kind == "solo" and sizes is None:
            sizes = single_rank_sizes(model, inputs)
        if kind == "xdit":
            fn = torch.compile(model, backend="xdit", options={"inner": spec["inner"], **cfg["options"]})
        elif kind == "diffusers":
            r["diffusers"], fn = _diffusers_tp(model, cfg["tp"], dev)
            if fn is None:
                calls[name] = None
                continue
        else:
            fn = model
        call = (lambda fn=fn, inputs=inputs: jobs._first_tensor(fn(**inputs, return_dict=False)))
        jobs._SOLO["on"] = kind == "solo"
        try:
            with torch.no_grad():
                jobs._barrier()
                t0 = time.perf_counter()
                call()
                jobs._sync()
                r["first_s"] = time.perf_counter() - t0
                if kind == "diffusers":
                    counter = jobs._CountCollectives()
                    with counter:
                        out = call()
                    records = counter.records
                else:
                    with record_collectives() as log:
                        out = call()
                    records = [(x.kind, x.nbytes, x.group_size) for x in log]
                r["handed"] = sum(n for _, n, _ in records)
                count: dict[tuple[str, int], int] = {}
                for k, n, _ in records:
                    count[(k, n)] = count.get((k, n), 0) + 1
                r["records"] = sorted(((k, n, c) for (k, n), c in count.items()), key=lambda x: -x[1] * x[2])
                r["kinds"] = sorted({k for k, _, _ in records})
                _, mem, _ = jobs._memory_probe(call)
                r["params"] = _param_bytes(model)
                r["forward_mib"] = mem["forward_mib"]
        finally:
            jobs._SOLO["on"] = False
        out = out.detach().float().cpu()
        if kind == "solo":
            ref = out
        elif ref is not None:
            r["rel_err"] = float((out - ref).abs().max() / ref.abs().max())
        calls[name] = call
        jobs._barrier()
    # Alternating timed rounds.
    times: dict[str, list[float]] = {c["name"]: [] for c in configs}
    with torch.no_grad():
        for _ in range(spec["iters"]):
            for cfg in configs:
                name = cfg["name"]
                jobs._barrier()
                call = calls[name]
                if call is None:
                    continue
                jobs._SOLO["on"] = cfg["kind"] == "solo"
                jobs._sync()
                t0 = time.perf_counter()
                call()
                jobs._sync()
                times[name].append(time.perf_counter() - t0)
                jobs._SOLO["on"] = False
    for name, ts in times.items():
        if ts:
            res[name]["times"] = ts
            res[name]["median_s"] = statistics.median(ts)
    return {"rank": rank, "device": jobs.device_name(), "configs": res, "sizes": sizes}


# ---------------------------------------------------------------------------------- the report
CONFIGS_2 = [
    {"name": "1 rank", "kind": "solo"},
    {"name": "TP 2", "kind": "xdit", "tp": 2, "options": {"tensor_parallel_degree": 2}},
    {"name": "Ulysses 2", "kind": "xdit", "ulysses": 2, "options": {"ulysses_degree": 2}},
    {"name": "diffusers _tp_plan TP 2", "kind": "diffusers", "tp": 2},
]
CONFIGS_4 = [
    {"name": "1 rank (4-process set)", "kind": "solo"},
    {"name": "TP 2 x Ulysses 2", "kind": "xdit", "tp": 2, "ulysses": 2,
     "options": {"tensor_parallel_degree": 2, "ulysses_degree": 2}},
]


def _row(cfg: dict[str, Any], per_rank: list[dict[str, Any]], sizes: dict[str, int], base_s: float | None) -> dict[str, Any]:
    rs = [p["configs"][cfg["name"]] for p in per_rank if "params" in p["configs"][cfg["name"]]]
    r0 = per_rank[0]["configs"][cfg["name"]]
    least = minimum(cfg, sizes)
    handed = max((r["handed"] for r in rs), default=0)
    params = max((r["params"] for r in rs), default=0)
    fwd = max((r["forward_mib"] for r in rs), default=float("nan"))
    return {
        "name": cfg["name"], "ranks": r0["world"], "params_mib": params / MIB, "forward_mib": fwd,
        "peak_mib": params / MIB + fwd, "median_s": r0.get("median_s"), "times": r0.get("times"),
        "speedup": (base_s / r0["median_s"]) if base_s and r0.get("median_s") else None,
        "handed_mib": handed / MIB, "min_mib": least / MIB if least else None,
        "ratio": handed / least if least else None, "rel_err": max((r.get("rel_err", 0.0) for r in rs), default=None),
        "kinds": r0.get("kinds"), "diffusers": r0.get("diffusers"), "first_s": r0.get("first_s"),
        "records": r0.get("records"),
    }


def report(raw: dict[str, Any], quick: bool) -> str:
    s = shape(quick)
    sizes = raw["sizes"]
    two, four = raw["2"], raw["4"]
    base2 = two[0]["configs"]["1 rank"]["median_s"]
    base4 = four[0]["configs"]["1 rank (4-process set)"]["median_s"]
    rows = [_row(c, two, sizes, base2) for c in CONFIGS_2] + [_row(c, four, sizes, base4) for c in CONFIGS_4]
    raw["rows"] = rows
    derived = sizes["rowwise"]
    tokens = s["side"] ** 2
    lines = [
        "# Tensor parallel side by side", "",
        f"Run of {raw['started']} ({raw['wall_s']:.0f} s), `python benchmarks/tensor_parallel.py"
        f"{' --quick' if quick else ''}`. Device: {two[0]['device']}; gloo; inner compiler `{raw['inner']}`; "
        f"load average before / after: {raw['load_before'][0]:.1f} / {raw['load_after'][0]:.1f}; two busy processes "
        f"got {raw['capacity'][0]:.2f} / {raw['capacity'][1]:.2f} cores before / after (`benchmarks.run.capacity_probe`; "
        "2.0 on an idle 2-core machine). The cores are shared with other sessions: timings are indicative, byte "
        "counts and parameter bytes exact.", "",
        f"Model: Flux-like `FluxTransformer2DModel`, random weights, float32, batch {s['batch']}: {tokens} image "
        f"tokens + {s['text']} text tokens (joint attention), hidden {s['heads'] * s['head_dim']} = {s['heads']} heads x "
        f"{s['head_dim']}, {s['double']} double + {s['single']} single blocks, text width {s['joint_dim']}. "
        f"Parameters on one rank: {rows[0]['params_mib']:.1f} MiB; latency: median of {raw['iters']} calls, the "
        "configurations of a set alternating call by call.", "",
        "| configuration | ranks | params kept / rank (MiB) | forward peak / rank (MiB) | peak / rank (MiB) | vs 1 rank "
        "| latency (s) | best (s) | speedup | bytes handed / rank / forward (MiB) | minimum (MiB) | ratio | error / scale |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    one_peak = rows[0]["peak_mib"]
    for r in rows:
        fmt = lambda v, f: (f.format(v) if v is not None and v == v else "-")  # noqa: E731
        lines.append(
            f"| {r['name']} | {r['ranks']} | {fmt(r['params_mib'], '{:.1f}')} | {fmt(r['forward_mib'], '{:.1f}')} | "
            f"{fmt(r['peak_mib'], '{:.1f}')} | {fmt(r['peak_mib'] / one_peak if one_peak else None, '{:.2f}x')} | "
            f"{fmt(r['median_s'], '{:.3f}')} | {fmt(min(r['times']) if r['times'] else None, '{:.3f}')} | "
            f"{fmt(r['speedup'], '{:.2f}x')} | {fmt(r['handed_mib'], '{:.2f}')} | "
            f"{fmt(r['min_mib'], '{:.2f}')} | {fmt(r['ratio'], '{:.3f}')} | {fmt(r['rel_err'], '{:.1e}')} |")
    dif = next(r for r in rows if r["name"].startswith("diffusers"))
    tp = next(r for r in rows if r["name"] == "TP 2")
    lines += [
        "", "Columns: params kept = parameters and buffers this rank holds after compiling (xdit: the slices it "
        "cut, the whole tensors freed; diffusers: the DTensor local shards), counted from the tensors; forward peak "
        + ("= `torch.cuda.max_memory_allocated` above the memory allocated before the call" if "CPU" not in
           two[0]["device"] else "= VmHWM above VmRSS during one forward (after `malloc_trim`, `/proc/self/clear_refs`)")
        + "; peak = the two summed; the worst rank is shown. Bytes handed: `record_collectives()` (xdit) or a "
        "dispatch mode over the c10d ops (diffusers), one forward, worst rank. Error: rank 0's output against the "
        "1-rank output of the same set, max abs difference / max abs of the reference.", "",
        "Minimum per forward (module docstring of `benchmarks/tensor_parallel.py`): TP 2 = one all-reduce of the "
        f"output of every row-parallel linear = {derived / MIB:.2f} MiB on one rank's sizes; Ulysses 2 = the four "
        "all-to-alls of the local q, k, v, output per joint attention + the output gather; TP 2 x Ulysses 2 = the "
        "all-reduces on the token shard (/2) + the all-to-alls of [B, H/2, S/2, D] + the output gather over 2.", "",
        "## diffusers' `_tp_plan`", "",
        f"`model.enable_parallelism(config=TensorParallelConfig(tp_degree=2))` on CPU: `{dif['diffusers']}`", "",
        f"Derived from its plan (`FluxTransformer2DModel._tp_plan`: q/k/v, add_q/k/v, the MLP inputs colwise; "
        f"to_out, to_add_out, the MLP outputs rowwise; the single blocks' proj_out packed rowwise; modulation, "
        f"embeddings and the final projection replicated): one all-reduce of the whole output of each rowwise "
        f"linear, {derived / MIB:.2f} MiB per forward per rank, the same as Megatron's minimum. Ours (TP 2) hands "
        f"{tp['handed_mib']:.2f} MiB ({tp['ratio']:.3f}x; the excess, listed below, is the gathers of the linears "
        "outside the blocks whose weights it splits (the image and text embeddings, the timestep MLP) and of the "
        "modulation linears, which it splits and gathers whole at once). Applied as diffusers applies it after its device check "
        f"(`parallelize_module` with diffusers' styles, on a CPU mesh) it hands {dif['handed_mib']:.2f} MiB "
        f"({dif['ratio']:.3f}x of the derivation; kinds {dif['kinds']}), keeps {dif['params_mib']:.1f} MiB of "
        f"parameters per rank against our {tp['params_mib']:.1f} MiB (it keeps the modulation linears whole), and "
        f"its output differs from one rank's by {dif['rel_err']:.1e} of the scale.", "",
        "Collectives per forward on rank 0 (kind: bytes handed x calls, largest total first):", "",
        *[f"- {r['name']}: " + ", ".join(f"{k} {n / 1024:.0f} KiB x {c}" for k, n, c in r["records"] or [])
          for r in rows if r["records"]], "",
        "4 processes share the 2 cores in the TP 2 x Ulysses 2 set: its latency is that of 4 ranks on 2 cores, "
        "against the 1-rank time measured in the same set. Latency is the median of the alternating calls, best "
        "the fastest of them; speedup = the set's 1-rank median / this median. When other processes load the "
        "machine (see the load average above), a single-thread forward gets a varying share of a core: compare "
        "the bytes and the memory, which do not depend on the load, before the times.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the CI smoke test)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per configuration (median; >= 5)")
    parser.add_argument("--inner", default="eager", help="xdit's inner compiler (eager | inductor)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args(argv)
    import torch

    from xdit_compile.testing import run_spmd

    start = time.perf_counter()
    raw: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(),
                           "iters": args.iters, "inner": args.inner}
    env = {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    from benchmarks.run import capacity_probe

    raw["capacity"] = [capacity_probe()]
    for world, configs in ((2, CONFIGS_2), (4, CONFIGS_4)):
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
        spec = {"quick": args.quick, "iters": args.iters, "inner": args.inner, "configs": configs}
        t = time.perf_counter()
        raw[str(world)] = run_spmd(bench_job, world, spec, timeout=args.timeout, backend=backend, env=env)
        print(f"[tp-bench] {world} processes: {time.perf_counter() - t:.0f} s", flush=True)
    raw["sizes"] = raw["2"][0]["sizes"]
    raw["load_after"] = os.getloadavg()
    raw["capacity"].append(capacity_probe())
    raw["wall_s"] = time.perf_counter() - start
    text = report(raw, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tensor_parallel.md").write_text(text)
    (out / "tensor_parallel.json").write_text(json.dumps(
        {"rows": raw["rows"], "sizes": raw["sizes"], "shape": shape(args.quick), "wall_s": raw["wall_s"]}, indent=1,
        default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
