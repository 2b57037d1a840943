"""Step time of a two-call-per-step guidance loop: one rank vs Ulysses alone vs CFG across calls.

Wan-like (``WanTransformer3DModel``, cross-attention to the text) and Flux-like
(``FluxTransformer2DModel``, joint attention) transformers with random weights; the loop calls the
model twice per step (prompt, then negative prompt, batch 1 each), as Wan's and Flux's true-CFG
pipelines do, and applies the guidance and an Euler update. Every method runs on the same ranks,
side by side in one launch:

* ``one rank``: each rank alone, the Dynamo graph run as captured (no communication; the same
  eager execution of a captured graph as the others' ``inner="eager"``, so Python overhead is alike);
* ``ulysses N``: ``torch.compile(backend="xdit", options={"ulysses_degree": N})`` over all ranks;
* ``cfg 2 across calls``: ``use_cfg_parallel=True`` (CFG 2 on 2 ranks; CFG 2 x Ulysses N/2 beyond).

Each method runs the loop once to compile and learn, then twice timed; the table gives the median
step time over the steps after the first, of the faster timed run (the first step of every
generation learns the branch pattern and computes both calls everywhere) and its ratio to one rank, and the largest difference of
the final latent from one rank's. Run (CPU, gloo):

    python benchmarks/cfg_calls.py --world 2 --size small
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SIZES = {  # heads x head_dim, layers, latent side (tokens per frame = side^2 / 4), frames, text tokens
    "small": dict(heads=4, head_dim=32, layers=2, side=32, frames=2, text=32),
    "medium": dict(heads=8, head_dim=32, layers=4, side=48, frames=3, text=64),
}


def _wan(size: dict[str, int]) -> tuple[torch.nn.Module, dict[str, Any], str]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=size["heads"], attention_head_dim=size["head_dim"], in_channels=16,
        out_channels=16, text_dim=64, freq_dim=64, ffn_dim=4 * size["heads"] * size["head_dim"],
        num_layers=size["layers"], rope_max_seq_len=64).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, size["frames"], size["side"], size["side"], generator=g)
    conds = [{"encoder_hidden_states": torch.randn(1, size["text"], 64, generator=g)} for _ in range(2)]
    return model, {"x": x, "conds": conds}, "hidden_states"


def _flux(size: dict[str, int]) -> tuple[torch.nn.Module, dict[str, Any], str]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    head_dim = size["head_dim"]
    third = head_dim // 4
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=size["layers"] // 2, num_single_layers=size["layers"] // 2,
        attention_head_dim=head_dim, num_attention_heads=size["heads"], joint_attention_dim=64,
        pooled_projection_dim=64, axes_dims_rope=(head_dim - 2 * third, third, third)).eval()
    g = torch.Generator().manual_seed(1)
    h = w = size["side"] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    x = torch.randn(1, h * w, 64, generator=g)
    conds = [{"encoder_hidden_states": torch.randn(1, size["text"], 64, generator=g),
              "pooled_projections": torch.randn(1, 64, generator=g)} for _ in range(2)]
    fixed = {"img_ids": ids.reshape(h * w, 3), "txt_ids": torch.zeros(size["text"], 3)}
    return model, {"x": x, "conds": conds, "fixed": fixed}, "hidden_states"


MODELS = {"wan-like": _wan, "flux-like": _flux}


def _loop(model: Any, inputs: dict[str, Any], steps: int, scale: float = 5.0) -> tuple[torch.Tensor, list[float]]:
    """``steps`` guidance steps of two calls each; (final latent, seconds per step)."""
    import torch.distributed as dist

    x = inputs["x"]
    times = []
    with torch.no_grad():
        for s in range(steps):
            dist.barrier()
            start = time.perf_counter()
            t = torch.tensor([1000.0 * (1 - s / steps)])
            cond, uncond = (model(hidden_states=x, timestep=t, **c, **inputs.get("fixed", {}), return_dict=False)[0]
                            for c in inputs["conds"])
            x = x - (1.0 / steps) * (uncond + scale * (cond - uncond))
            times.append(time.perf_counter() - start)
    return x, times


def _bench(names: list[str], size_name: str, steps: int) -> dict[str, Any]:
    import torch.distributed as dist

    world = dist.get_world_size()
    size = SIZES[size_name]
    methods = {"one rank": None, f"ulysses {world}": {"ulysses_degree": world, "inner": "eager"},
               "cfg 2 across calls": {"use_cfg_parallel": True, "inner": "eager",
                                      **({"ulysses_degree": world // 2} if world > 2 else {})}}
    out: dict[str, Any] = {}
    for name in names:
        model, inputs, _ = MODELS[name](size)
        ref = None
        for method, options in methods.items():
            torch._dynamo.reset()
            fn = (torch.compile(model, backend=lambda gm, ex: gm.forward) if options is None
                  else torch.compile(model, backend="xdit", options=dict(options)))
            _loop(fn, inputs, steps)  # compile, learn
            # The machine may be shared: the faster of two timed runs.
            x, times = min((_loop(fn, inputs, steps) for _ in range(2)), key=lambda r: statistics.median(r[1][1:]))
            ref = x if ref is None else ref
            out[(name, method)] = {"step_ms": 1e3 * statistics.median(times[1:]), "first_ms": 1e3 * times[0],
                                   "err": float((x - ref).abs().max()), "scale": float(ref.abs().max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    from xdit_compile.testing import run_spmd

    results = run_spmd(_bench, args.world, args.models, args.size, args.steps, timeout=1800.0)
    r0 = results[0]
    print(f"{args.world} ranks, size {args.size}, {args.steps} steps; median step time after the first, "
          "rank 0 (the machine may be loaded: read the ratios)")
    print(f"{'model':<10} {'method':<22} {'ms/step':>9} {'vs one rank':>12} {'first step ms':>14} {'max err/scale':>14}")
    for (name, method), r in r0.items():
        base = r0[(name, "one rank")]["step_ms"]
        print(f"{name:<10} {method:<22} {r['step_ms']:>9.1f} {r['step_ms'] / base:>12.2f} {r['first_ms']:>14.1f} "
              f"{r['err'] / max(r['scale'], 1e-12):>14.1e}")


if __name__ == "__main__":
    main()
