"""Transformer time per generation with and without step caching, one rank and Ulysses 2, side by side.

    .venv/bin/python benchmarks/step_cache.py                 # Wan (6 blocks) and Flux (2 + 4 blocks)
    .venv/bin/python benchmarks/step_cache.py --steps 8 --size 16 --out /tmp/step_cache.md

Each configuration compiles the model (backend "xdit", inner "eager"), runs one generation to warm up,
then times ``--gens`` generations of ``--steps`` transformer calls (an Euler-like loop with decreasing
timesteps; the update is negligible) and keeps the fastest. Rows: uncached, FBCache and TeaCache at
the given thresholds, each on one rank (this process, no process group) and on 2 ranks (Ulysses 2,
gloo, ``run_spmd``). Reported: seconds per generation, calls whose blocks were skipped, the ratio to
the uncached time of the same plan, and the max error of the final latent against the uncached one
(relative to its scale). On a shared, loaded machine read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make(name: str, size: int, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A small but deeper-than-tiny model (so that skipping blocks shows) and its inputs, batch 2."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "wan":
        from diffusers import WanTransformer3DModel

        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=6,
                                  rope_max_seq_len=64)
        kw = {"hidden_states": torch.randn(2, 4, 2, size, size, generator=g),
              "encoder_hidden_states": torch.randn(2, 8, 32, generator=g)}
    else:
        from diffusers import FluxTransformer2DModel

        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        ids = torch.zeros(size, size, 3)
        ids[..., 1] = torch.arange(size)[:, None]
        ids[..., 2] = torch.arange(size)[None, :]
        kw = {"hidden_states": torch.randn(2, size * size, 16, generator=g),
              "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
              "pooled_projections": torch.randn(2, 32, generator=g), "img_ids": ids.reshape(-1, 3),
              "txt_ids": torch.zeros(8, 3)}
    return m.eval(), kw


def generation(fn: Any, name: str, kw: dict[str, Any], steps: int) -> torch.Tensor:
    x = kw["hidden_states"].clone()
    with torch.no_grad():
        for i in range(steps):
            frac = 1 - i / steps
            t = torch.full((2,), frac) if name == "flux" else torch.full((2,), int(999 * frac), dtype=torch.long)
            x = x - (0.5 / steps) * fn(**{**kw, "hidden_states": x, "timestep": t}, return_dict=False)[0]
    return x


def configs(name: str, fb: dict[str, float], tea: dict[str, float]) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) of the rows of one model: uncached, FBCache, TeaCache at that model's thresholds."""
    return [("none", {}), (f"fbcache {fb[name]:g}", {"use_fbcache": True, "cache_threshold": fb[name]}),
            (f"teacache {tea[name]:g}", {"use_teacache": True, "cache_threshold": tea[name]})]


def measure(names: list[str], fb: dict[str, float], tea: dict[str, float], steps: int, size: int, gens: int,
            parallel: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (model, config) on this process: seconds per generation, skipped calls, error vs uncached."""
    import xdit_compile

    rows = []
    for name in names:
        model, kw = make(name, size)
        base = None
        for label, options in configs(name, fb, tea):
            torch._dynamo.reset()
            xdit_compile.clear_reports()
            fn = torch.compile(model, backend="xdit", options={**parallel, **options, "inner": "eager"})
            generation(fn, name, kw, steps)  # compile + warm up
            best, out = float("inf"), None
            for _ in range(gens):
                start = time.perf_counter()
                out = generation(fn, name, kw, steps)
                best = min(best, time.perf_counter() - start)
            skipped = 0
            for r in xdit_compile.reports():
                if hasattr(r.step_cache, "generations") and r.step_cache.generations:
                    skipped = sum(not d.computed for d in r.step_cache.generations[-1].calls)
            base = out if base is None else base
            rows.append({"model": name, "cache": label, "seconds": best, "skipped": skipped,
                         "err": float((out - base).abs().max() / base.abs().max())})
    return rows


def _spmd_measure(*args: Any) -> list[dict[str, Any]]:
    return measure(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=16, help="latent height = width")
    ap.add_argument("--gens", type=int, default=3, help="timed generations per configuration (fastest kept)")
    # Per model: their first block's residual changes by ~0.1 (wan) and ~0.3 (flux) per step.
    ap.add_argument("--fb", default="wan=0.12,flux=0.4", help="FBCache threshold per model")
    ap.add_argument("--tea", default="wan=0.15,flux=0.15", help="TeaCache threshold per model")
    ap.add_argument("--models", default="wan,flux")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    names = a.models.split(",")
    fb = {k: float(v) for k, v in (kv.split("=") for kv in a.fb.split(","))}
    tea = {k: float(v) for k, v in (kv.split("=") for kv in a.tea.split(","))}
    from xdit_compile.testing.harness import run_spmd

    single = measure(names, fb, tea, a.steps, a.size, a.gens, {})
    par = run_spmd(_spmd_measure, 2, names, fb, tea, a.steps, a.size, a.gens, {"ulysses_degree": 2},
                   timeout=1800)[0]
    lines = [f"step cache: {a.steps} steps per generation, latent {a.size}x{a.size}, batch 2, fp32, 1 thread per rank",
             "", "| model | cache | 1 rank s/gen | ratio | skipped | err | Ulysses 2 s/gen | ratio | skipped | err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s, p in zip(single, par):
        s0 = next(r["seconds"] for r in single if r["model"] == s["model"] and r["cache"] == "none")
        p0 = next(r["seconds"] for r in par if r["model"] == p["model"] and r["cache"] == "none")
        lines.append(f"| {s['model']} | {s['cache']} | {s['seconds']:.3f} | {s['seconds'] / s0:.2f} | "
                     f"{s['skipped']}/{a.steps} | {s['err']:.2g} | {p['seconds']:.3f} | {p['seconds'] / p0:.2f} | "
                     f"{p['skipped']}/{a.steps} | {p['err']:.2g} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
