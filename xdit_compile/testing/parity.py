"""Compare a model compiled with backend "xdit" on several ranks against one rank, eagerly.

Models come from a factory named ``"module:function"`` returning ``(model, inputs)`` for
``(name, batch=, seed=)``, so this module names no model. Each rank builds the same model
from the same seed, runs the single-rank eager reference itself, then the compiled model,
and reports the error, FLOPs of both runs, and the plan report. Per-rank FLOPs count every
run of each per-rank graph, plus the work between graph breaks, which runs eagerly on every
rank (taken as one rank's: the reference minus what the model's graphs compute on one rank).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from .harness import run_spmd


@dataclass(frozen=True)
class ParityResult:
    """One rank's outcome."""

    rank: int
    max_abs_err: float
    scale: float
    flops: int
    ref_flops: int
    report: str
    fallback: str | None
    collectives: tuple[tuple[str, int, int], ...]

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / max(self.scale, 1e-12)


def load_factory(spec: str) -> Callable[..., tuple[torch.nn.Module, dict[str, Any]]]:
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"no tensor in model output of type {type(out).__name__}")


_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class _CountFlops(TorchDispatchMode):
    """FLOPs of the aten ops that run (FlopCounterMode's formulas, without its module hooks,
    which make torch.compile fall back to the uncompiled module)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket is _CPU_SDPA:
            # No formula in torch for the CPU flash kernel: count it as the CUDA kernels are
            # counted, or per-rank attention would vanish from the totals.
            self.total += int(sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))
            return out
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def _flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    counter = _CountFlops()
    with counter:
        out = fn()
    return out, counter.total


class _Tally:
    """A Dynamo backend wrapper that counts how often each compiled graph runs.

    ``kept`` is the backend's list of (report, per-rank graph, example inputs), appended per
    compile (``XDIT_KEEP_GRAPHS=1``); without it the Dynamo graph itself is what runs.
    """

    def __init__(self, backend: Callable[..., Callable], kept: list | None = None) -> None:
        self.backend, self.kept = backend, kept
        self.graphs: list[list[Any]] = []  # [graph that runs, its example inputs, calls]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
        start = len(self.kept) if self.kept is not None else 0
        fn = self.backend(gm, example_inputs, **kwargs)
        if self.kept is None:
            entry = [gm, list(example_inputs), 0]
        else:
            new = self.kept[start:]
            entry = [new[-1][1], new[-1][2], 0] if new else [None, [], 0]
        self.graphs.append(entry)

        def run(*args: Any) -> Any:
            entry[2] += 1
            return fn(*args)

        return run

    def reset(self) -> None:
        for entry in self.graphs:
            entry[2] = 0

    def breaks(self) -> bool:
        """Whether eager code may have run between graphs (more than one graph, or one run twice)."""
        return sum(e[2] for e in self.graphs) > 1

    def flops(self) -> int:
        total = 0
        for gm, args, calls in self.graphs:
            if calls and gm is not None and not any(isinstance(a, torch.SymInt) for a in args):
                total += calls * _flops(lambda: gm(*args))[1]
        return total


def parity_job(factory: str, name: str, options: dict[str, Any], batch: int = 2, seed: int = 0,
               dynamo_config: dict[str, Any] | None = None) -> ParityResult:
    """Run on every rank (inside ``run_spmd``): reference, compiled run, comparison.

    ``dynamo_config`` patches ``torch._dynamo.config`` around the compiled calls only (e.g.
    ``capture_dynamic_output_shape_ops=True`` to capture ``nonzero`` instead of breaking the graph).
    """
    import contextlib
    import torch.distributed as dist

    import xdit_compile
    from xdit_compile.runtime.collectives import record_collectives

    os.environ.setdefault("XDIT_STRICT", "1")
    os.environ["XDIT_KEEP_GRAPHS"] = "1"
    from xdit_compile.backend import xdit_backend
    from xdit_compile.context import current

    xdit_compile.clear_reports()
    kept = current().graphs
    kept.clear()
    torch._dynamo.reset()

    model, inputs = load_factory(factory)(name, batch=batch, seed=seed)
    with torch.no_grad():
        ref, ref_flops = _flops(lambda: _first_tensor(model(**inputs, return_dict=False)))
        tally = _Tally(lambda gm, ex, **kw: xdit_backend(gm, ex, options=dict(options)), kept)
        compiled = torch.compile(model, backend=tally)
        patched = (lambda: torch._dynamo.config.patch(**dynamo_config)) if dynamo_config else contextlib.nullcontext
        with patched():
            compiled(**inputs, return_dict=False)  # compile once; measure the second call
        tally.reset()
        with record_collectives() as log, patched():
            out = _first_tensor(compiled(**inputs, return_dict=False))
        # Dynamo runs no compiled frame under a dispatch mode: count each per-rank graph as often
        # as the measured call ran it. Graphs Dynamo recompiled with dynamic shapes hold
        # SymInts, not values: not counted.
        flops = tally.flops()
        if tally.breaks():
            # Code between graph breaks runs eagerly on every rank, outside the backend: count it
            # as one rank's (the reference minus what one rank's graphs of the model compute).
            torch._dynamo.reset()
            whole = _Tally(lambda gm, ex, **kw: gm.forward)
            eager = torch.compile(model, backend=whole)
            with patched():
                eager(**inputs, return_dict=False)
                whole.reset()
                eager(**inputs, return_dict=False)
            flops += max(0, ref_flops - whole.flops())
    reports = xdit_compile.reports()
    last = reports[-1] if reports else None
    fallbacks = [r.fallback for r in reports if r.fallback]
    return ParityResult(
        rank=dist.get_rank(),
        max_abs_err=float((out.float() - ref.float()).abs().max()),
        scale=float(ref.float().abs().max()),
        flops=int(flops),
        ref_flops=int(ref_flops),
        report="\n".join(str(r) for r in reports) if last else "",
        fallback="; ".join(fallbacks) or None,
        collectives=tuple((r.kind, r.nbytes, r.group_size) for r in log),
    )


def parity_many(factory: str, names: list[str], options: dict[str, Any], batch: int = 2,
                dynamo_config: dict[str, Any] | None = None) -> list[ParityResult]:
    """``parity_job`` for several models in one process (one spawn for many checks)."""
    return [parity_job(factory, name, options, batch, dynamo_config=dynamo_config) for name in names]


def check_parity(
    factory: str, name: str, world_size: int, options: dict[str, Any], batch: int = 2, seed: int = 0,
    timeout: float = 600.0,
) -> list[ParityResult]:
    """Spawn ``world_size`` gloo ranks and return each rank's ``ParityResult``."""
    return run_spmd(parity_job, world_size, factory, name, options, batch, seed, timeout=timeout)
