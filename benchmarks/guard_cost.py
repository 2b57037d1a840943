"""Per-call cost of the input check (``check_inputs``, on by default) against the call it guards.

    python benchmarks/guard_cost.py            # tiny PixArt and a PixArt-alpha-width 512 px shape
    python benchmarks/guard_cost.py --quick    # the tiny shape only (seconds)

On 2 CPU ranks (gloo, 1 thread each), Ulysses 2, each shape is compiled with backend "xdit"
(``--inner``, eager by default) and called ``--calls`` times. Per call, the check is two float64
sums per user input and one all-gather of those few floats over every rank, outside the graph
(``runtime/guard.py``). Reported, per shape, as medians over the calls (the largest over the
ranks): the compiled call with the check, the check alone (timed on the same arguments), their
ratio, and the call with ``check_inputs=False`` for an end-to-end comparison (noisier: two
separate runs on a shared 2-core machine).

Prints a Markdown table and writes ``benchmarks/results/guard_cost.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from xdit_compile.testing.harness import run_spmd  # noqa: E402


def _model(shape: str) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(model, inputs, description): the tiny test model, or PixArt-alpha's width at 512 px, 1 layer."""
    from diffusers import PixArtTransformer2DModel

    if shape == "tiny":
        from examples.tiny_dits import make

        model, inputs = make("pixart")
        return model, inputs, "tiny PixArt (latent 2x4x16x16, 64 tokens, hidden 64, 2 layers)"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    heads, hd, size, text, cap = 16, 72, 64, 120, 4096
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hd, in_channels=4, out_channels=8, num_layers=1,
        norm_type="ada_norm_single", use_additional_conditions=False, sample_size=size, patch_size=2,
        caption_channels=cap, cross_attention_dim=heads * hd,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(2, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(2, text, cap, generator=g),
        "timestep": torch.randint(0, 1000, (2,), generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return model, inputs, (f"PixArt-alpha width at 512 px (latent 2x4x{size}x{size}, {(size // 2) ** 2} tokens, "
                           f"hidden {heads * hd}, text 2x{text}x{cap}, 1 layer)")


def _measure(shapes: list[str], calls: dict[str, int], inner: str) -> list[dict[str, Any]]:
    """Run on every rank: per shape, call times with and without the check, and the check alone."""
    import torch.distributed as dist

    from xdit_compile.runtime import guard as guard_mod

    guards: list[Any] = []
    init = guard_mod.Guarded.__init__

    def keep(self: Any, *args: Any, **kw: Any) -> None:  # the benchmark times the guard it creates
        init(self, *args, **kw)
        guards.append(self)

    guard_mod.Guarded.__init__ = keep  # type: ignore[method-assign]
    rows = []
    with torch.no_grad():
        for shape in shapes:
            model, inputs, what = _model(shape)
            times: dict[bool, list[float]] = {}
            for check in (True, False):
                torch._dynamo.reset()
                guards.clear()
                compiled = torch.compile(model, backend="xdit", dynamic=False,
                                         options={"ulysses_degree": 2, "inner": inner, "check_inputs": check})
                compiled(**inputs, return_dict=False)  # compile
                times[check] = []
                for _ in range(calls[shape]):
                    dist.barrier()
                    start = time.perf_counter()
                    compiled(**inputs, return_dict=False)
                    times[check].append(time.perf_counter() - start)
                if check:
                    guard = guards[-1]
                    args = _flat_args(compiled, guard, inputs)
                    alone = []
                    for _ in range(max(calls[shape], 20)):
                        dist.barrier()
                        start = time.perf_counter()
                        guard.check_inputs(args)
                        alone.append(time.perf_counter() - start)
            on, off, chk = (statistics.median(times[True]), statistics.median(times[False]),
                            statistics.median(alone))
            rows.append({"shape": what, "calls": calls[shape], "call_ms": on * 1e3, "unchecked_ms": off * 1e3, "check_ms": chk * 1e3,
                         "inputs": len(guard.inputs)})
    guard_mod.Guarded.__init__ = init  # type: ignore[method-assign]
    return rows


def _flat_args(compiled: Any, guard: Any, inputs: dict[str, Any]) -> list[Any]:
    """The flat arguments Dynamo passes the guard: recorded from one more call."""
    seen: list[tuple[Any, ...]] = []
    call = guard.fn

    def record(*args: Any) -> Any:
        seen.append(args)
        return call(*args)

    guard.fn = record
    compiled(**inputs, return_dict=False)
    guard.fn = call
    return list(seen[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny shape only")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per shape and setting "
                        "(default: 50 for the tiny shape, 7 for the 512 px one)")
    parser.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    shapes = ["tiny"] if args.quick else ["tiny", "medium"]
    calls = {"tiny": args.calls or 50, "medium": args.calls or 7}
    per_rank = run_spmd(_measure, 2, shapes, calls, args.inner, timeout=1800)
    lines = [
        f"Input check per call (2 CPU ranks, gloo, Ulysses 2, inner={args.inner}; medians over the calls, "
        "largest over the ranks; `python benchmarks/guard_cost.py`)",
        "",
        "| shape | user inputs | calls | call with check (ms) | check alone (ms) | check / call | "
        "call, check_inputs=False (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(per_rank[0]):
        worst = {k: max(r[i][k] for r in per_rank) for k in ("call_ms", "unchecked_ms", "check_ms")}
        lines.append(f"| {row['shape']} | {row['inputs']} | {row['calls']} | {worst['call_ms']:.2f} | {worst['check_ms']:.3f} | "
                     f"{worst['check_ms'] / worst['call_ms']:.2%} | {worst['unchecked_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "guard_cost.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
