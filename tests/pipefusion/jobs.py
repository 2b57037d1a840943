"""Per-rank jobs for the PipeFusion tests (module-level so ``run_spmd`` can spawn them).

Each job builds a tiny model from ``examples.tiny_dits`` with the same seed on every rank,
computes the single-rank reference first (PipeFusion frees the weights other stages own),
then runs the compiled model.
"""

from __future__ import annotations

import os
from typing import Any

import torch

def _build(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from examples.tiny_dits import make

    return make(name)


def _tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _timestep(name: str, inputs: dict[str, Any], t: float) -> dict[str, Any]:
    """Inputs with every sample's timestep set to ``t`` in [0, 1] (scaled to the model's range)."""
    ts = inputs["timestep"]
    value = t if ts.is_floating_point() else round(t * 999)
    return {**inputs, "timestep": torch.full_like(ts, value)}


def euler_loop(model: Any, name: str, inputs: dict[str, Any], steps: int, calls_per_step: int = 1) -> torch.Tensor:
    """A short flow-matching Euler loop over the latent (``hidden_states``); returns the last latent.

    ``calls_per_step=2`` calls the model twice per step on the same latent and timestep (as
    true CFG does, cond then uncond) and mixes the two predictions.
    """
    x = inputs["hidden_states"].clone()
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    for s, s_next in zip(sigmas, sigmas[1:]):
        step_inputs = _timestep(name, {**inputs, "hidden_states": x}, s)
        v = _tensor(model(**step_inputs, return_dict=False))
        if calls_per_step == 2:
            other = {**step_inputs, "encoder_hidden_states": step_inputs["encoder_hidden_states"] * 0.5}
            v = v + 0.5 * (v - _tensor(model(**other, return_dict=False)))
        v = v[:, : x.shape[1]] if v.shape != x.shape else v
        x = x + (s_next - s) * v
    return x


def pipeline_job(cases: list[tuple[str, dict[str, Any], int, int]]) -> list[dict[str, Any]]:
    """For each (model, options, steps, calls_per_step): errors of the compiled loop vs the eager one."""
    from xdit_compile import pipefusion

    os.environ.setdefault("XDIT_STRICT", "1")
    out = []
    for name, options, steps, calls in cases:
        torch._dynamo.reset()
        pipefusion.clear_reports()
        pipefusion.reset()
        model, inputs = _build(name)
        with torch.no_grad():
            ref = euler_loop(model, name, inputs, steps, calls)
            compiled = torch.compile(model, backend="xdit", options={"inner": "eager", **options})
            with pipefusion.record_p2p() as log:
                got = euler_loop(compiled, name, inputs, steps, calls)
        reps = pipefusion.reports()
        rep = reps[-1]
        out.append({
            "model": name, "options": options, "steps": steps,
            "err": float((got - ref).abs().max()), "scale": float(ref.abs().max()),
            "patches": rep.patches, "stage": rep.stage, "param_bytes": rep.param_bytes,
            "param_bytes_total": rep.param_bytes_total, "block_param_bytes": rep.block_param_bytes,
            "block_param_bytes_total": rep.block_param_bytes_total, "report": "\n".join(str(r) for r in reps),
            "p2p": [tuple(r) for r in log], "calls": list(rep.driver.calls),
            "graphs": len(reps), "rank": torch.distributed.get_rank(),
            "notes": rep.notes,
        })
    return out
