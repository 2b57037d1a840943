"""GPU check: parity of every parallel method on tiny models, then timings at a realistic shape.

    bash benchmarks/gpu_check.sh                        # torchrun on every visible CUDA device (nccl)
    torchrun --nproc-per-node 2 benchmarks/gpu_check.py --dry-run --out /tmp/gc   # CPU, gloo, tiny: seconds

Part 1, parity (float32, exact methods within ``--tolerance`` of the output's scale): a tiny PixArt
(cross attention, heads = max(4, world) so Ulysses fits every world) and, when the world is at most 4, the
tiny Flux of ``examples/tiny_dits.py`` (joint attention, RoPE), each under Ulysses, Ring, USP (world >= 4),
CFG (x Ulysses), data parallel, and PipeFusion: exact (warmup over every step) and with stale K/V (M = 2,
W = 1, within ``STALE_BOUND`` like tests/pipefusion). Each runs a short Euler loop, eagerly on every rank
(the single-rank reference) and with ``backend="xdit"``; the worst error over the ranks is recorded.
Part 2, timings: a PixArt model at 1024 px's token count (4,096 image tokens; on GPU hidden 1,152 =
16 x 72 as PixArt-alpha, ``--layers`` layers, bfloat16; in the dry run a small one), batch 2, the same
loop on one rank vs each method on all ranks, alternating, medians of ``--repeat``.
The dry run keeps only the tiny PixArt for parity and times only Ulysses and PipeFusion.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``benchmarks/results/``; the dry run
defaults to a temporary directory so it never overwrites GPU results). Exit status 1 when a parity check
fails. The attention kernel the runtime picks for the timed shape is recorded (flash-attn, SDPA flash /
efficient on CUDA, ATen's CPU flash kernel on CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import xdit_compile  # noqa: E402
from xdit_compile.runtime.kernels import choose_kernel  # noqa: E402

STALE_BOUND = 1e-2  # PipeFusion with stale K/V (M = 2, W = 1): the bound of docs/pipefusion.md


def methods(world: int) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, options, exact) for every method that fits ``world`` ranks."""
    out: list[tuple[str, dict[str, Any], bool]] = [
        (f"Ulysses {world}", {"ulysses_degree": world}, True),
        (f"Ring {world}", {"ring_degree": world}, True),
    ]
    if world >= 4 and world % 2 == 0:
        out.append((f"USP 2x{world // 2}", {"ulysses_degree": 2, "ring_degree": world // 2}, True))
    if world % 2 == 0:
        cfg: dict[str, Any] = {"use_cfg_parallel": True}
        if world > 2:
            cfg["ulysses_degree"] = world // 2
        out.append(("CFG 2" + (f" x Ulysses {world // 2}" if world > 2 else ""), cfg, True))
    out.append((f"data parallel {world}", {"data_parallel_degree": world}, True))
    pf = {"pipefusion_parallel_degree": world, "num_pipeline_patch": 2}
    out.append((f"PipeFusion {world} (M=2, warmup all)", {**pf, "warmup_steps": 100}, True))
    out.append((f"PipeFusion {world} (M=2, W=1, stale K/V)", {**pf, "warmup_steps": 1}, False))
    return out


# ---------------------------------------------------------------------------------------------- models


def tiny_pixart(world: int, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """PixArt with hidden 16 x max(4, world) heads, max(2, world) layers (PipeFusion stages), 64 tokens."""
    from diffusers import PixArtTransformer2DModel

    heads, layers, batch = max(4, world), max(2, world), max(2, world)
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=layers,
        norm_type="ada_norm_single", use_additional_conditions=False, sample_size=16, patch_size=2,
        caption_channels=32, cross_attention_dim=16 * heads)
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(batch, 4, 16, 16, generator=g),
              "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
              "timestep": torch.randint(0, 1000, (batch,), generator=g),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return model.eval().to(device), _to(inputs, device)


def tiny_flux(world: int, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The tiny Flux of examples/tiny_dits.py (4 heads, 1 + 1 blocks), batch max(2, world)."""
    from examples.tiny_dits import make

    model, inputs = make("flux", batch=max(2, world))
    return model.to(device), _to(inputs, device)


def realistic_pixart(dry_run: bool, layers: int, device: torch.device, dtype: torch.dtype
                     ) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """PixArt-alpha 1024 px shape (4,096 tokens, hidden 1,152, 120 text tokens), batch 2; small when dry."""
    from diffusers import PixArtTransformer2DModel

    heads, hd, size, text = (4, 16, 32, 8) if dry_run else (16, 72, 128, 120)
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hd, in_channels=4, out_channels=8, num_layers=layers,
        norm_type="ada_norm_single", use_additional_conditions=False, sample_size=size, patch_size=2,
        caption_channels=heads * hd, cross_attention_dim=heads * hd)
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 4, size, size, generator=g).to(dtype),
              "encoder_hidden_states": torch.randn(2, text, heads * hd, generator=g).to(dtype),
              "timestep": torch.randint(0, 1000, (2,), generator=g),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    what = (f"PixArt {layers} layer(s), {(size // 2) ** 2} image tokens + {text} text tokens, hidden {heads * hd} "
            f"= {heads} x {hd}, batch 2, {str(dtype).replace('torch.', '')}")
    return model.eval().to(device=device, dtype=dtype), _to(inputs, device), what


def _to(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def euler_loop(model: Callable[..., Any], inputs: dict[str, Any], steps: int) -> torch.Tensor:
    """A flow-matching Euler loop over ``hidden_states`` with the timestep set per step (PipeFusion's steps)."""
    x = inputs["hidden_states"].clone()
    ts = inputs["timestep"]
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    for s, s_next in zip(sigmas, sigmas[1:]):
        t = torch.full_like(ts, s if ts.is_floating_point() else round(s * 999))
        v = model(**{**inputs, "hidden_states": x, "timestep": t}, return_dict=False)[0]
        v = v[:, : x.shape[1]] if v.shape != x.shape else v  # PixArt also predicts the variance
        x = x + (s_next - s) * v
    return x


# ---------------------------------------------------------------------------------------------- runs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worst(value: float) -> float:
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return max(every)


def _own_copy(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    # PipeFusion frees the weights of the other stages' blocks in the model it compiles; the
    # reference keeps running on the original.
    return copy.deepcopy(model) if options.get("pipefusion_parallel_degree", 1) > 1 else model


def parity(world: int, device: torch.device, inner: str, steps: int, tolerance: float,
           models: list[str]) -> list[dict[str, Any]]:
    rows = []
    builders = [(n, {"pixart": tiny_pixart, "flux": tiny_flux}[n]) for n in models
                if n == "pixart" or world <= 4]  # the tiny Flux has 4 heads
    for model_name, build in builders:
        model, inputs = build(world, device)
        with torch.no_grad():
            ref = euler_loop(model, inputs, steps)
        scale = float(ref.abs().max().clamp_min(1e-12))
        for name, options, exact in methods(world):
            row: dict[str, Any] = {"model": model_name, "method": name, "options": options, "exact": exact}
            start = time.perf_counter()
            try:
                compiled = torch.compile(_own_copy(model, options), backend="xdit", options={"inner": inner, **options})
                with torch.no_grad():
                    out = euler_loop(compiled, inputs, steps)
                err = float((out - ref).abs().max()) / scale
                row["plan"] = xdit_compile.reports()[-1].plan if xdit_compile.reports() else "?"
            except Exception as e:  # one failing method must not hide the others' results
                err = float("inf")
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                if dist.get_rank() == 0:
                    traceback.print_exc()
            row["rel_err"] = _worst(err)
            bound = tolerance if exact else STALE_BOUND
            row["bound"] = bound
            row["ok"] = row["rel_err"] <= bound and (exact or row["rel_err"] > 0)
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            if dist.get_rank() == 0:
                print(f"  {model_name:<7} {name:<34} rel err {row['rel_err']:.1e} (bound {bound:.0e}) "
                      f"{'ok' if row['ok'] else 'FAIL'}  {row['seconds']:.1f} s", flush=True)
            torch._dynamo.reset()
            xdit_compile.clear_reports()
    return rows


def timings(world: int, device: torch.device, inner: str, dry_run: bool, layers: int, dtype: torch.dtype,
            steps: int, repeat: int) -> dict[str, Any]:
    model, inputs, what = realistic_pixart(dry_run, layers, device, dtype)
    heads = model.config.num_attention_heads
    hd = model.config.attention_head_dim
    q = torch.empty(1, heads, 16, hd, device=device, dtype=dtype)
    kernel = choose_kernel(q, q, q, None).name
    result: dict[str, Any] = {"shape": what, "steps": steps, "repeat": repeat, "kernel": kernel, "rows": []}
    if dist.get_rank() == 0:
        print(f"timings: {what}; {steps}-step loop; local attention kernel: {kernel}", flush=True)

    def timed(fn: Callable[[], Any]) -> float:
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        _sync(device)
        return time.perf_counter() - start

    for name, options, exact in methods(world):
        if "warmup all" in name:
            continue  # the timed PipeFusion is the one with stale K/V (what it is for)
        if dry_run and not (name.startswith("Ulysses") or "PipeFusion" in name):
            continue  # the dry run checks the timing code (plain and pipelined), not the numbers
        if heads % max(options.get("ulysses_degree", 1), 1):
            continue
        row: dict[str, Any] = {"method": name, "options": options}
        try:
            compiled = torch.compile(_own_copy(model, options), backend="xdit", options={"inner": inner, **options})
            timed(lambda: euler_loop(compiled, inputs, steps))  # compile + warm-up
            timed(lambda: euler_loop(model, inputs, steps))
            ref, par = [], []
            for _ in range(repeat):
                ref.append(timed(lambda: euler_loop(model, inputs, steps)))
                par.append(timed(lambda: euler_loop(compiled, inputs, steps)))
            row["one_rank_s"] = statistics.median(ref)
            row["parallel_s"] = statistics.median(par)
            row["speedup"] = row["one_rank_s"] / row["parallel_s"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            if dist.get_rank() == 0:
                traceback.print_exc()
        result["rows"].append(row)
        if dist.get_rank() == 0:
            msg = (f"1 rank {row['one_rank_s'] * 1e3:.1f} ms, {world} ranks {row['parallel_s'] * 1e3:.1f} ms: "
                   f"{row['speedup']:.2f}x") if "speedup" in row else row["error"][:200]
            print(f"  {name:<34} {msg}", flush=True)
        torch._dynamo.reset()
        xdit_compile.clear_reports()
    return result


def markdown(summary: dict[str, Any]) -> str:
    env = summary["env"]
    lines = [f"# GPU check ({'CPU dry run' if summary['dry_run'] else env['device_name']})", "",
             f"{env['world']} ranks, backend {env['backend']}, torch {env['torch']}, flash-attn {env['flash_attn']}, "
             f"inner {summary['inner']}, {summary['date']}.", "",
             "## Parity against one rank", "", "| model | method | rel err | bound | ok |", "|---|---|---|---|---|"]
    for r in summary["parity"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['rel_err']:.1e} | {r['bound']:.0e} | "
                     f"{'yes' if r['ok'] else 'NO: ' + r.get('error', 'error above the bound')[:120]} |")
    t = summary["timings"]
    lines += ["", f"## Timings: {t['shape']}", "",
              f"{t['steps']}-step Euler loop, medians of {t['repeat']} alternating runs; local attention kernel "
              f"`{t['kernel']}`.", "", f"| method | 1 rank | {env['world']} ranks | speedup |", "|---|---|---|---|"]
    for r in t["rows"]:
        if "speedup" in r:
            lines.append(f"| {r['method']} | {r['one_rank_s'] * 1e3:.1f} ms | {r['parallel_s'] * 1e3:.1f} ms | "
                         f"{r['speedup']:.2f}x |")
        else:
            lines.append(f"| {r['method']} | | | error: {r['error'][:120]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny shapes, inner eager: seconds")
    ap.add_argument("--out", default=None, help="directory for gpu_check.json / .md")
    ap.add_argument("--inner", default=None, choices=["eager", "inductor"], help="default: inductor (eager dry)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the timed model (default 4; dry run 1)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps per loop (default 4; dry run 2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed loops of each (default 5; dry run 1)")
    ap.add_argument("--tolerance", type=float, default=None, help="exact methods' bound (default 1e-3; dry 1e-4)")
    ap.add_argument("--models", default=None, help="parity models, from pixart,flux (default both; dry run pixart)")
    ap.add_argument("--skip-timings", action="store_true")
    args = ap.parse_args()

    dry = args.dry_run
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        print("gpu_check.py: no CUDA device visible; run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # Exact parity: no TF32 in the reference or the sharded convolutions/matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    inner = args.inner or ("eager" if dry else "inductor")
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dry else 1e-3)
    out_dir = args.out or (os.path.join(tempfile.gettempdir(), "xdit_gpu_check_dry_run") if dry
                           else os.path.join(ROOT, "benchmarks", "results"))
    env = {"world": world, "backend": str(dist.get_backend()), "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
           "flash_attn": _flash_attn_version()}
    if rank == 0:
        print(f"gpu_check: {world} ranks, {env['backend']}, {env['device_name']}, inner {inner}"
              + (" (dry run)" if dry else ""), flush=True)
        print("parity:", flush=True)
    start = time.perf_counter()
    models = (args.models or ("pixart" if dry else "pixart,flux")).split(",")
    rows = parity(world, device, inner, 2 if dry else 3, tolerance, models)
    timing: dict[str, Any] = {"shape": "skipped", "steps": 0, "repeat": 0, "kernel": "-", "rows": []}
    if not args.skip_timings:
        timing = timings(world, device, inner, dry, args.layers or (1 if dry else 4),
                         torch.float32 if dry else torch.bfloat16, args.steps or (2 if dry else 4),
                         args.repeat or (1 if dry else 5))
    summary = {"dry_run": dry, "inner": inner, "date": time.strftime("%Y-%m-%d %H:%M"), "env": env,
               "parity": rows, "timings": timing, "seconds": round(time.perf_counter() - start, 1)}
    failed = [f"{r['model']} {r['method']}" for r in rows if not r["ok"]]
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
            f.write(markdown(summary))
        print(f"parity: {'OK' if not failed else 'FAILED: ' + ', '.join(failed)}; wrote {out_dir}/gpu_check.md "
              f"and gpu_check.json ({summary['seconds']} s)", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


def _flash_attn_version() -> str:
    try:
        import flash_attn  # type: ignore[import-not-found]
    except (ImportError, OSError):
        return "not installed"
    return str(getattr(flash_attn, "__version__", "installed"))


if __name__ == "__main__":
    sys.exit(main())
