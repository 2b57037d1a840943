"""One Ulysses attention layer, 2 ranks: zero-copy layouts vs the generic all-to-all path vs yunchang.

    PYTHONPATH=<dir with yunchang> .venv/bin/python benchmarks/ulysses_layer.py [--rounds 5] [--out FILE]

Three ways to run the same layer on the same local shards, alternating call by call (round i
runs each once, in turn) so that the shared machine's load hits all of them alike:

* ``xdit``: ``runtime.attention.ulysses_attention`` as the backend inserts it (one copy into the
  all-to-all's send buffer, the kernel reading the receive buffer in place, one copy back:
  ``runtime/ulysses_layout.py``);
* ``generic``: the path main used before (``torch.stack`` of q/k/v, ``collectives.all_to_all``
  with its ``movedim().contiguous()`` and ``cat``, the same for the output), same kernel;
* ``yunchang``: ``yunchang.UlyssesAttention`` (three all-to-alls, ``all_to_all_4D``), with its
  attention function set to the same CPU kernel (``F.scaled_dot_product_attention``, whose CPU
  dispatch is the flash kernel ``runtime/kernels.py`` calls), as in ``benchmarks/jobs.py``.

Inputs are what a model hands over: the projections' outputs ``[B, s, H, D]``; xdit and generic
take their ``transpose(1, 2)`` view (``[B, H, s, D]``, not contiguous), yunchang takes them as is.
Shape: PixArt-alpha 1024 px (4,096 tokens, 16 heads x 72, batch 2 for CFG), float32, one thread
per rank, gloo. Writes a markdown table (medians, ratios, load average) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _generic_ulysses(q: Any, k: Any, v: Any, group: str, sizes: list[int]) -> Any:
    """Main's Ulysses body before this change (kept here as the 'before' of the comparison)."""
    import torch

    from xdit_compile.runtime.attention import attention_with_lse
    from xdit_compile.runtime.collectives import all_to_all

    q, k, v = all_to_all(torch.stack([q, k, v]), 2, 3, group, gather_sizes=sizes).unbind(0)
    out, _ = attention_with_lse(q, k, v)
    return all_to_all(out, 2, 1, group, scatter_sizes=sizes)


def layer_job(spec: dict[str, Any]) -> dict[str, Any]:
    """What one rank runs: every variant once per round, ``spec['rounds']`` rounds."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from xdit_compile.runtime.attention import ulysses_attention

    n, r = dist.get_world_size(), dist.get_rank()
    b, s, h, d = spec["batch"], spec["tokens"], spec["heads"], spec["head_dim"]
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(b, s, h, d, generator=g) for _ in range(3)]
    loc = slice(r * s // n, (r + 1) * s // n)
    yq, yk, yv = (t[:, loc].contiguous() for t in full)  # projection outputs [B, s, H, D]
    q, k, v = (t.transpose(1, 2) for t in (yq, yk, yv))
    sizes = [s // n] * n
    world = dist.group.WORLD.group_name
    calls = {
        "xdit": lambda: ulysses_attention(q, k, v, group=world, q_sizes=sizes, kv_sizes=sizes),
        "generic": lambda: _generic_ulysses(q, k, v, world, sizes),
    }
    if spec.get("ring"):
        from xdit_compile.runtime import attention as attn_mod

        def blocking(x: Any, offset: int, group: Any, wait: bool = True) -> Any:
            return shift(x, offset, group)  # waits at once: no overlap

        def ring_blocking() -> Any:
            attn_mod.shift = blocking
            try:
                return ring_attention(q, k, v, group=world, kv_sizes=sizes)
            finally:
                attn_mod.shift = shift

        shift = attn_mod.shift
        ring_attention = attn_mod.ring_attention
        calls = {"ring": lambda: ring_attention(q, k, v, group=world, kv_sizes=sizes), "ring_blocking": ring_blocking}
    errors: dict[str, str] = {}
    try:
        from yunchang import UlyssesAttention
        from yunchang.kernels import AttnType

        layer = UlyssesAttention(dist.group.WORLD, scatter_idx=2, gather_idx=1, attn_type=AttnType.TORCH_MATH)

        def sdpa_bshd(q_: Any, k_: Any, v_: Any, softmax_scale: Any = None, causal: bool = False,
                      **_: Any) -> Any:
            o = F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                               scale=softmax_scale, is_causal=causal)
            return o.transpose(1, 2)

        layer.attn_fn = sdpa_bshd
        if not spec.get("ring"):
            calls["yunchang"] = lambda: layer(yq, yk, yv).transpose(1, 2)
    except Exception as e:  # noqa: BLE001 - recorded in the results
        errors["yunchang"] = f"{type(e).__name__}: {e}"
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in full))[:, :, loc]
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    max_err: dict[str, float] = {}
    with torch.no_grad():
        for name, call in calls.items():  # warm-up and exactness
            max_err[name] = float((call() - ref).abs().max())
        order = list(calls)
        for i in range(spec["rounds"]):
            # Odd rounds reverse the order, so no variant always runs first after the others.
            for name in (order if i % 2 == 0 else order[::-1]):
                call = calls[name]
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                call()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    return {"rank": r, "times": times, "cpu": cpu, "max_err": max_err, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ring", action="store_true",
                        help="instead: Ring 2 with the K/V pass overlapped vs waited at once")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ulysses_layer.md"))
    args = parser.parse_args()
    from xdit_compile.testing import run_spmd

    spec = {"batch": 2, "tokens": args.tokens, "heads": 16, "head_dim": 72, "rounds": args.rounds, "ring": args.ring}
    load_before = os.getloadavg()
    results = run_spmd(layer_job, 2, spec, timeout=1800, env={"OMP_NUM_THREADS": "1"})
    load_after = os.getloadavg()
    # A call ends when its rank's last collective is done: take the slower rank per round.
    names = list(results[0]["times"])
    per_round = {name: [max(res["times"][name][i] for res in results) for i in range(args.rounds)]
                 for name in names}
    med = {name: statistics.median(ts) for name, ts in per_round.items()}
    # CPU seconds of both ranks' processes (compute, copies, gloo's threads): less exposed to
    # the other tenants of a shared machine than wall time, which waits for them.
    cpu = {name: statistics.median(sum(res["cpu"][name][i] for res in results) for i in range(args.rounds))
           for name in names}
    base = names[0]
    lines = [
        f"# One {'Ring' if args.ring else 'Ulysses'} attention layer, 2 ranks (`benchmarks/ulysses_layer.py`)",
        "",
        f"PixArt-alpha 1024 px shape: batch {spec['batch']}, {spec['tokens']} tokens, 16 heads x 72, float32, "
        f"gloo, 1 thread per rank; {args.rounds} alternating rounds (odd rounds in reverse order), median of the slower rank per round.",
        f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)} on a shared 2-core machine.",
        "",
        "| variant | median wall s | wall ratio vs first row (>1: first faster) | median CPU s (2 ranks) | CPU ratio "
        "vs first | max abs err vs one rank | rounds, wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / med[base]:.3f} | {cpu[name]:.3f} | "
                     f"{cpu[name] / cpu[base]:.3f} | "
                     f"{results[0]['max_err'][name]:.2e} | {', '.join(f'{t:.2f}' for t in per_round[name])} |")
    for name in names[1:]:
        ratios = [per_round[name][i] / per_round[base][i] for i in range(args.rounds)]
        lines.append(f"\n{name} / {base} per round (wall): {', '.join(f'{x:.3f}' for x in ratios)}; median "
                     f"**{statistics.median(ratios):.3f}**")
    for name, err in results[0]["errors"].items():
        lines.append(f"\n{name}: not run ({err})")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
