"""The demo's digits DiT (``examples/digits_dit.py``, committed weights) sampled under "xdit" on 2 ranks.

The sampler makes one batched [cond; uncond] call per step; CFG parallelism splits that batch and
Ulysses the 16 tokens of each image. Both must give the single-rank samples (fp32, within 1e-5 of the
[-1, 1] range; measured 0.0), and the model must really be split (each plan as asked).
One spawn runs both.
"""

from __future__ import annotations

from typing import Any

import torch

from xdit_compile.testing.harness import run_spmd

CASES = [("cfg", {"use_cfg_parallel": True}), ("ulysses", {"ulysses_degree": 2})]


def digits_job(steps: int) -> list[dict[str, Any]]:
    import xdit_compile
    from examples.digits_dit import load, sample

    model = load()
    labels = torch.arange(10)
    ref = sample(model, labels, steps=steps)
    out = []
    for name, options in CASES:
        xdit_compile.clear_reports()
        compiled = torch.compile(model, backend="xdit", options={"inner": "eager", **options})
        got = sample(compiled, labels, steps=steps)
        out.append({"case": name, "diff": float((got - ref).abs().max()), "plan": xdit_compile.reports()[-1].plan,
                    "range": float(ref.max() - ref.min())})
        torch._dynamo.reset()
    return out


def test_digits_sampled_across_ranks_equal_one_rank() -> None:
    per_rank = run_spmd(digits_job, 2, 4, timeout=300)
    for rank, results in enumerate(per_rank):
        for r in results:
            assert r["diff"] <= 1e-5, (rank, r)
            assert r["range"] > 1.0, r  # the samples are images, not a constant
        plans = {r["case"]: r["plan"] for r in results}
        assert "cfg=2" in plans["cfg"] and "ulysses=2" in plans["ulysses"], plans
