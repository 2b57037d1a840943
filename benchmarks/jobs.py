"""What one rank runs (inside ``xdit_compile.testing.run_spmd``): build, compile, time, record.

Every job returns a plain dict (picklable by ``torch.save``). Timing: the first call compiles
(its wall time is reported as ``first_s``), then ``iters`` timed calls; the first timed call runs
under ``record_collectives()`` (the "second call" of the issue) and the last one is the memory
probe (see :func:`_memory_probe`). Times are per call, wall clock, after a barrier so that all
ranks start together.

Peers (diffusers' native context parallel, para-attn, yunchang) are jobs here too, so that they
run the same models, shapes, harness and timing loop.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import re
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from benchmarks import models


# ---------------------------------------------------------------------------------- helpers
def device() -> str:
    """``cuda:<local rank>`` when a GPU is visible (nccl run), else ``cpu``."""
    if torch.cuda.is_available():
        idx = dist.get_rank() % torch.cuda.device_count() if dist.is_initialized() else 0
        torch.cuda.set_device(idx)
        return f"cuda:{idx}"
    return "cpu"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} (1 thread per rank)"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_SOLO = {"on": False}  # a solo spec runs on rank 0 alone: no barriers inside it


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1 and not _SOLO["on"]:
        dist.barrier()


def _cpu_time() -> float:
    """CPU seconds of this process and of the children it waited for (inductor's C++ compiler runs
    as a child process, which the process's own CPU clock would miss)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return out.sample


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def _memory_probe(call: Callable[[], Any]) -> tuple[Any, dict[str, float], float]:
    """Run ``call`` once and measure its peak memory above what was resident before it.

    CPU: release freed heap pages (``malloc_trim``), read the resident set (VmRSS), reset the
    kernel's high-water mark (write ``5`` to ``/proc/self/clear_refs``), run, read VmHWM. The
    difference is the peak of memory the forward allocated (activations, communication buffers,
    workspace); parameters and compiled code were resident before and are in ``resident_mib``.
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Returns the
    output, the figures and the seconds of ``call`` alone (the preparation is not timed).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = call()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        return out, {"resident_mib": base / 2**20, "peak_mib": peak / 2**20, "forward_mib": (peak - base) / 2**20}, elapsed
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kib("VmRSS")
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    _barrier()  # the preparation above takes different times on different ranks
    c0 = _cpu_time()
    start = time.perf_counter()
    out = call()
    elapsed = time.perf_counter() - start
    cpu = _cpu_time() - c0
    peak = _status_kib("VmHWM")
    return out, {
        "resident_mib": base / 1024, "peak_mib": peak / 1024,
        "forward_mib": (peak - base) / 1024 if reset else float("nan"), "_cpu": cpu,
    }, elapsed


def _timed(call: Callable[[], Any], iters: int, record: bool, memory: bool) -> dict[str, Any]:
    """Time ``iters`` calls of ``call`` (each after a barrier); see the module docstring."""
    from xdit_compile.runtime.collectives import record_collectives

    times: list[float] = []
    cpu: list[float] = []
    records: list[tuple[str, int, int]] = []
    mem: dict[str, float] = {}
    out = None
    for i in range(iters):
        _barrier()
        _sync()
        c0 = _cpu_time()
        if i == 0 and record:
            with record_collectives() as log:
                start = time.perf_counter()
                out = call()
                _sync()
                times.append(time.perf_counter() - start)
            records = [(r.kind, r.nbytes, r.group_size) for r in log]
        elif i == iters - 1 and memory:
            out, mem, elapsed = _memory_probe(call)
            times.append(elapsed)
            cpu.append(mem.pop("_cpu", _cpu_time() - c0))
            continue
        else:
            start = time.perf_counter()
            out = call()
            _sync()
            times.append(time.perf_counter() - start)
        cpu.append(_cpu_time() - c0)
    return {"times": times, "median_s": statistics.median(times), "min_s": min(times), "cpu_s": statistics.median(cpu),
            "records": records, "memory": mem, "out": out, "load": os.getloadavg()[0]}


def _summary(out: torch.Tensor) -> dict[str, float]:
    o = out.detach().float().cpu()
    return {"checksum": float(o.double().sum()), "absmax": float(o.abs().max()), "shape": list(o.shape)}


# ---------------------------------------------------------------------------------- xdit / baselines
def model_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration on this rank.

    ``spec``: model, quick, batch, iters, mode ("xdit" | "inductor" | "eager"), options (xdit
    options), record, memory. "xdit" on one process is the single-rank baseline of the same
    pipeline (Dynamo graph -> inner compiler, no passes).
    """
    import xdit_compile
    from xdit_compile.report import clear_reports

    dev = device()
    model, inputs, shape = models.build(spec["model"], spec["quick"], spec["batch"], device=dev)
    clear_reports()
    mode = spec["mode"]
    if mode == "xdit":
        fn = torch.compile(model, backend="xdit", options=dict(spec["options"]))
    elif mode == "inductor":
        fn = torch.compile(model)
    else:
        fn = model

    def call() -> torch.Tensor:
        return _first_tensor(fn(**inputs, return_dict=False))

    with torch.no_grad():
        _barrier()
        c0 = _cpu_time()
        start = time.perf_counter()
        call()
        _sync()
        first = time.perf_counter() - start
        first_cpu = _cpu_time() - c0
        res = _timed(call, spec["iters"], spec.get("record", False), spec.get("memory", False))
    reps = xdit_compile.reports()
    res["first_cpu_s"] = first_cpu
    out = res.pop("out")
    res.update(
        first_s=first,
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        device=device_name(),
        pass_seconds=sum(sum(r.pass_seconds.values()) for r in reps),
        pass_detail={k: v for r in reps for k, v in r.pass_seconds.items()},
        graphs=len(reps),
        fallbacks=[r.fallback for r in reps if r.fallback],
        plan=[r.plan for r in reps],
        report="\n".join(str(r) for r in reps),
        summary=_summary(out),
        shape=dataclasses.asdict(shape),
        out=out.detach().cpu() if dist.get_rank() == 0 and spec.get("return_out", True) else None,
    )
    return res


# ---------------------------------------------------------------------------------- peers
def _patch_device_count() -> None:
    """diffusers' context parallel computes ``rank % torch.accelerator.device_count()``, which is
    0 on a CPU-only machine (ZeroDivisionError); make it report one device, in this process only."""
    if not torch.cuda.is_available():
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]


class _CountCollectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes handed to c10d / functional collectives by peers (their code is not ours to record)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        # wait_tensor and _wrap_tensor_autograd pass the result of a collective on: not collectives.
        if "c10d" in name and "wait" not in name and "wrap_tensor" not in name:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lists = [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            first = tensors[:1] or lists[:1]
            kind = "all_to_all" if "all_to_all" in name or "alltoall" in name else (
                "all_gather" if "gather" in name else ("all_reduce" if "reduce" in name else name))
            # The input buffer: for c10d in-place ops args are (output, input, ...).
            src = tensors[1] if ("alltoall_base" in name and len(tensors) > 1) else (first[0] if first else None)
            if "_allgather_base" in name or "allgather_into_tensor" in name:
                src = tensors[1] if len(tensors) > 1 else src
            nbytes = int(src.numel() * src.element_size()) if src is not None else 0
            self.records.append((kind, nbytes, dist.get_world_size()))
        return func(*args, **(kwargs or {}))


def diffusers_cp_job(spec: dict[str, Any]) -> dict[str, Any]:
    """diffusers' native context parallel: ``model.enable_parallelism(ContextParallelConfig(...))``."""
    from diffusers import ContextParallelConfig

    _patch_device_count()
    dev = device()
    model, inputs, _ = models.build(spec["model"], spec["quick"], spec["batch"], device=dev)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=spec.get("ulysses"), ring_degree=spec.get("ring")))
    return _peer_loop(lambda: _first_tensor(model(**inputs, return_dict=False)), spec)


def para_attn_job(spec: dict[str, Any]) -> dict[str, Any]:
    """ParaAttention's context parallel (Ulysses) through its diffusers adapter for the model."""
    import importlib

    from para_attn.context_parallel import init_context_parallel_mesh

    dev = device()
    model, inputs, _ = models.build(spec["model"], spec["quick"], spec["batch"], device=dev)
    adapter = importlib.import_module(f"para_attn.context_parallel.diffusers_adapters.{spec['model']}")
    mesh = init_context_parallel_mesh(dev.split(":")[0], max_ulysses_dim_size=spec.get("ulysses"))
    adapter.parallelize_transformer(model, mesh=mesh)
    return _peer_loop(lambda: _first_tensor(model(**inputs, return_dict=False)), spec)


def _peer_loop(call: Callable[[], torch.Tensor], spec: dict[str, Any]) -> dict[str, Any]:
    with torch.no_grad():
        _barrier()
        start = time.perf_counter()
        call()
        _sync()
        first = time.perf_counter() - start
        counter = _CountCollectives()
        with counter:
            call()
        res = _timed(call, spec["iters"], False, spec.get("memory", False))
    out = res.pop("out")
    res.update(first_s=first, rank=dist.get_rank(), world=dist.get_world_size(), device=device_name(),
               records=counter.records, summary=_summary(out),
               out=out.detach().cpu() if dist.get_rank() == 0 else None)
    return res


def attention_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One attention layer at a model's shape: single-rank SDPA, xdit's Ulysses runtime (what the
    backend inserts), and yunchang's ``UlyssesAttention``, on the same local shards."""
    import torch.nn.functional as F

    from xdit_compile.runtime.attention import ulysses_attention

    n, r = dist.get_world_size(), dist.get_rank()
    b, s, h, d = spec["batch"], spec["tokens"], spec["heads"], spec["head_dim"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    loc = slice(r * s // n, (r + 1) * s // n)
    ql, kl, vl = (t[:, :, loc].contiguous() for t in (q, k, v))
    sizes = [s // n] * n
    world = dist.group.WORLD.group_name
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "xdit": lambda: ulysses_attention(ql, kl, vl, group=world, q_sizes=sizes, kv_sizes=sizes),
    }
    if r == 0 and spec.get("single", True):
        calls["single"] = lambda: F.scaled_dot_product_attention(q, k, v)
    out: dict[str, Any] = {"rank": r, "world": n, "device": device_name(), "errors": {}}
    try:
        from yunchang import UlyssesAttention
        from yunchang.kernels import AttnType

        layer = UlyssesAttention(dist.group.WORLD, scatter_idx=2, gather_idx=1, attn_type=AttnType.TORCH_MATH)

        def sdpa_bshd(q_, k_, v_, softmax_scale=None, causal=False, **_: Any) -> torch.Tensor:
            # The same CPU kernel xdit uses (SDPA's default), in yunchang's [B, S, H, D] layout: its
            # own TORCH_* kernels call CUDA-only ops or force the slower MATH backend.
            o = F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                               scale=softmax_scale, is_causal=causal)
            return o.transpose(1, 2)

        layer.attn_fn = sdpa_bshd
        # yunchang takes [B, S_local, H, D].
        yq, yk, yv = (t.transpose(1, 2).contiguous() for t in (ql, kl, vl))
        calls["yunchang"] = lambda: layer(yq, yk, yv).transpose(1, 2)
    except Exception as e:  # noqa: BLE001 - recorded in the results
        out["errors"]["yunchang"] = f"{type(e).__name__}: {e}"
    ref = F.scaled_dot_product_attention(q, k, v)[:, :, loc]
    with torch.no_grad():
        for name, call in calls.items():
            if name == "single":
                continue
            try:
                o = call()  # warm-up
                out.setdefault("max_err", {})[name] = float((o.float() - ref.float()).abs().max())
                res = _timed(call, spec["iters"], False, False)
                out[name] = res["median_s"]
            except Exception as e:  # noqa: BLE001
                out["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            _barrier()
        if "single" in calls:  # rank 0 alone: no barrier
            calls["single"]()
            times = []
            for _ in range(spec["iters"]):
                start = time.perf_counter()
                calls["single"]()
                _sync()
                times.append(time.perf_counter() - start)
            out["single"] = statistics.median(times)
    return out


# ---------------------------------------------------------------------------------- a list of jobs
JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "model": model_job, "diffusers_cp": diffusers_cp_job, "para_attn": para_attn_job, "attention": attention_job,
}


def _warm_inductor() -> None:
    """Compile a tiny function once so every measured compile finds inductor imported and
    initialised (the first compile of a process pays that, whichever configuration it is)."""
    f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x).sum(0))
    f(torch.randn(8, 8))
    torch._dynamo.reset()


def suite_job(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run several specs in one set of processes (saves the ~10 s start-up per process set).

    A spec with ``solo=True`` runs on rank 0 alone (the single-rank baseline) while the others
    wait. Every spec compiles cold: Dynamo is reset and inductor gets a fresh cache directory.
    Errors are caught per spec and returned as ``{"error": ...}``.
    """
    import tempfile
    import traceback

    rank = dist.get_rank()
    if any(s.get("mode") == "inductor" or (s.get("options") or {}).get("inner") == "inductor" for s in specs):
        _warm_inductor()
    results = []
    for spec in specs:
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="xdit-bench-inductor-")
        _barrier()
        if spec.get("solo") and rank != 0:
            results.append({"key": spec["key"], "skipped": "solo spec: rank 0 only"})
            _barrier()
            continue
        _SOLO["on"] = bool(spec.get("solo"))
        t0 = time.perf_counter()
        try:
            res = JOBS[spec.get("job", "model")](spec)
        except Exception as e:  # noqa: BLE001 - recorded in the results table
            res = {"error": f"{type(e).__name__}: {str(e)[:600]}", "traceback": traceback.format_exc()[-3000:]}
        _SOLO["on"] = False
        if rank == 0:
            status = res.get("error", "")[:120] or f"median {res.get('median_s', 0):.3f} s"
            print(f"[bench]   {spec['key']}: {time.perf_counter() - t0:.0f} s ({status})", file=sys.stderr, flush=True)
        res["key"] = spec["key"]
        if spec.get("solo"):
            res["world"] = 1
        results.append(res)
        gc.collect()
        if spec.get("solo"):
            _barrier()
    return results


def busy_job(seconds: float) -> float:
    """Multiply matrices for ``seconds`` of wall time on one thread; return the CPU seconds obtained."""
    torch.set_num_threads(1)
    x = torch.randn(256, 256)
    c0, t0 = _cpu_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = torch.tanh(x @ x)
    return _cpu_time() - c0
