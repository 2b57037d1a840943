"""Per-rank jobs of the adversarial tests: a careless or hostile user's programs, every plan.

Every case must either give the single-rank result (error within float tolerance of the
scale) or raise a clear ``XditError`` naming what went wrong; nothing else is accepted.
One spawn per world size runs every case (module-level functions, so ``run_spmd`` can pickle
them); references are computed in the same process, eagerly, before compiling.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F

Result = dict[str, Any]


def _attn(h: torch.Tensor) -> torch.Tensor:
    q = h.view(h.shape[0], h.shape[1], 2, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q * 0.5, q).transpose(1, 2).flatten(2)


# ---------------------------------------------------------------- in-place statements
# Each writes a tensor in place as a statement (its result unused), the way research code does.
def masked_fill_scores(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
    sim = q @ q.transpose(-1, -2)
    sim.masked_fill_(~keep, -1e9)  # CompVis latent-diffusion attention
    return (sim.softmax(-1) @ q).transpose(1, 2).flatten(2)


def copy_into_slice(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    table = torch.zeros(x.shape)
    table[..., :4].copy_(x[..., :4] * 2)
    return _attn(x + table)


def silu_inplace_kw(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x) * 2
    F.silu(h, inplace=True)
    return h + 1


def relu_inplace_positional(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x) - 0.1
    F.relu(h, True)
    return h * 3


def leaky_relu_inplace(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x) - 0.1
    F.leaky_relu(h, 0.1, inplace=True)
    return h


def torch_relu_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = x - 0.2
    torch.relu_(h)
    return _attn(h)


def clamp_method(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x)
    h.clamp_(min=-0.05, max=0.05)
    return h


def setitem_column(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x) * 2
    h[:, :, 0] = 5.0
    return h


def augmented_on_view(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x) * 1.0
    v = h[..., :2]
    v += 1.0
    return h


def mul_on_view(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = x * 1.0
    h[:, :, 1].mul_(4.0)
    return _attn(h)


def fill_on_slice(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x) + 0.0
    h[..., -1:].fill_(0.25)
    return h


def add_out(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    c = torch.empty(x.shape)
    torch.add(x, 1.0, out=c)
    return _attn(c)


def view_then_write(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h = _attn(x) * 1.0
    d = h.diagonal(0, 1, 2)  # a view that needs the whole h ...
    h.add_(1.0)  # ... and sees this later write: sharding h would make d a stale copy
    return d * 2.0


INPLACE: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
    masked_fill_scores, copy_into_slice, silu_inplace_kw, relu_inplace_positional, leaky_relu_inplace, torch_relu_,
    clamp_method, setitem_column, augmented_on_view, mul_on_view, fill_on_slice, add_out, view_then_write,
]


def _fn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g) > 0.3


def _compiled(fn: Any, options: dict) -> Any:
    torch._dynamo.reset()
    return torch.compile(fn, backend="xdit", options={"inner": "eager", **options})


def _err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return float((got.detach() - ref.detach()).abs().max()), float(ref.abs().max())


def _last_report() -> str:
    import xdit_compile

    return "\n".join(str(r) for r in xdit_compile.reports())


def inplace_results(plans: dict[str, dict]) -> list[Result]:
    """Every in-place spelling on every plan: the error against the eager function."""
    import xdit_compile

    x, keep = _fn_inputs()
    out = []
    for fn in INPLACE:
        ref = fn(x.clone(), keep)
        for plan, options in plans.items():
            xdit_compile.clear_reports()
            got = _compiled(fn, options)(x.clone(), keep)
            err, scale = _err(got, ref)
            out.append({"case": f"{fn.__name__}/{plan}", "err": err, "scale": scale, "report": _last_report()})
    return out


# ---------------------------------------------------------------- a hand-written DiT
def toy_results(plans: dict[str, dict]) -> list[Result]:
    """The toy DiT (both write styles) on every plan, against its eager output."""
    import xdit_compile
    from tests.adversarial.toy import make_toy

    out = []
    for local in (False, True):
        for plan, options in plans.items():
            model, inputs = make_toy(local_writes=local)
            with torch.no_grad():
                ref = model(**inputs)
                xdit_compile.clear_reports()
                got = _compiled(model, options)(**inputs)
            err, scale = _err(got, ref)
            out.append({"case": f"toy_{'local' if local else 'whole'}_writes/{plan}", "err": err, "scale": scale,
                        "report": _last_report()})
    return out


# ---------------------------------------------------------------- gradients
def gradient_results(plans: dict[str, dict]) -> list[Result]:
    """Forward under grad mode is exact; backward gives one rank's gradients, or raises GradientError
    where the plan has no gradient rules (PipeFusion): never wrong gradients."""
    import xdit_compile
    from tests.adversarial.toy import make_toy

    out = []
    for plan, options in plans.items():
        model, inputs = make_toy(local_writes=True)
        inputs["x"].requires_grad_(True)
        ref = model(**inputs)
        ref.square().sum().backward()
        ref_grads = {"x": inputs["x"].grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
        model.zero_grad(set_to_none=True)
        inputs["x"].grad = None
        xdit_compile.clear_reports()
        got = _compiled(model, options)(**inputs)
        err, scale = _err(got, ref)
        grad_err = float("nan")
        try:
            got.square().sum().backward()
            raised = "no error"
            grads = {"x": inputs["x"].grad, **dict(model.named_parameters())}
            floor = 1e-3 * max(float(g.abs().max()) for g in ref_grads.values())
            grad_err = 0.0
            for name, r in ref_grads.items():
                g = grads[name] if name == "x" else grads[name].grad
                g = torch.zeros_like(r) if g is None else g
                grad_err = max(grad_err, float((g - r).abs().max()) / max(float(r.abs().max()), floor))
        except Exception as e:  # noqa: BLE001 - the type is what the test checks
            raised = f"{type(e).__name__}: {e}"
        out.append({"case": f"backward/{plan}", "err": err, "scale": scale, "raised": raised,
                    "grad_err": grad_err, "report": _last_report()})
    return out


# ---------------------------------------------------------------- misuse of switches
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def misuse_results() -> list[Result]:
    """Switches and annotations used wrongly: still exact, and the logs or report say what happened."""
    import xdit_compile

    x, keep = _fn_inputs()
    records = _Records()
    logger = logging.getLogger("xdit_compile")
    logger.addHandler(records)
    out = []
    try:
        # Disabling a pass that another needs: the dependent is skipped too, with a warning.
        os.environ["XDIT_DISABLE_PASSES"] = "plan:sp,no_such_pass"
        try:
            got = _compiled(silu_inplace_kw, {"ulysses_degree": 2})(x.clone(), keep)
        finally:
            del os.environ["XDIT_DISABLE_PASSES"]
        err, scale = _err(got, silu_inplace_kw(x.clone(), keep))
        out.append({"case": "disable_plan_pass", "err": err, "scale": scale, "logs": list(records.lines)})
        records.lines.clear()

        # Train-mode dropout: exact only in distribution, so the report and the log warn.
        def dropout(x: torch.Tensor) -> torch.Tensor:
            return F.dropout(_attn(x), 0.1, training=True)

        xdit_compile.clear_reports()
        _compiled(dropout, {"ulysses_degree": 2})(x.clone())
        out.append({"case": "train_mode_dropout", "err": 0.0, "scale": 1.0, "logs": list(records.lines),
                    "report": _last_report()})

        # A forced split is reported as an annotation, not as "sharded inputs: none".
        def forced(x: torch.Tensor) -> torch.Tensor:
            return _attn(xdit_compile.shard(x * 1.0, 1))

        xdit_compile.clear_reports()
        got = _compiled(forced, {"ulysses_degree": 2})(x.clone())
        err, scale = _err(got, _attn(x))
        out.append({"case": "forced_split_reported", "err": err, "scale": scale, "report": _last_report()})
    finally:
        logger.removeHandler(records)
    return out


def world_job(inplace_plans: dict[str, dict], toy_plans: dict[str, dict], grad_plans: dict[str, dict],
              misuse: bool) -> list[Result]:
    """Everything one world size runs, in one spawn."""
    torch.manual_seed(0)
    results = inplace_results(inplace_plans) + toy_results(toy_plans) + gradient_results(grad_plans)
    return results + (misuse_results() if misuse else [])
