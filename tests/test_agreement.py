"""Ranks that disagree raise ``RankMismatchError`` on every rank within seconds, never hang or go wrong.

One ``run_spmd`` of 2 ranks runs every case in turn (a spawned rank costs ~10 s here), catching
each expected error inside the ranks: different inputs per rank (seeded differently, or the
CFG halves swapped), different weights, different options (Ulysses 2 on rank 0, CFG 2 on rank
1: a hang before the check), different input shapes (a gloo abort before), different code (a
constant per rank traced into the graph), options that make no plan on one rank; a normal run stays exact, and ``check_inputs=False`` turns the check off.
Exact: the normal run is compared with one rank's eager output within 1e-5 of its scale.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from xdit_compile.testing.harness import run_spmd

_PIXART = "pixart"


def _attempt(fn: Callable[[], Any]) -> tuple[str, str, float]:
    """(error class, message, seconds) of running ``fn``; ("ok", "", seconds) when it returns."""
    import xdit_compile

    start = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the case records what it raised
        inner = xdit_compile.unwrap(e)
        return type(inner).__name__, str(inner), time.monotonic() - start
    return "ok", "", time.monotonic() - start


def _cases() -> dict[str, tuple[str, str, float]]:
    import torch.distributed as dist

    from examples.tiny_dits import make

    rank = dist.get_rank()
    out: dict[str, tuple[str, str, float]] = {}
    base = {"inner": "eager", "ulysses_degree": 2}

    def run(options: dict[str, Any], model_seed: int = 0, inputs: dict[str, Any] | None = None,
            calls: int = 1) -> torch.Tensor:
        torch._dynamo.reset()
        model, example = make(_PIXART, seed=model_seed)
        compiled = torch.compile(model, backend="xdit", options=options, dynamic=False)
        for _ in range(calls):
            got = compiled(**(inputs or example), return_dict=False)[0]
        return got

    with torch.no_grad():
        model, inputs = make(_PIXART)
        ref = model(**inputs, return_dict=False)[0]

        def normal() -> None:
            got = run(base, calls=2)
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, f"normal run not exact: {err}"

        out["normal"] = _attempt(normal)

        _, seeded = make(_PIXART, seed=10 * rank)
        out["inputs"] = _attempt(lambda: run(base, inputs=seeded))
        swapped = {**inputs, "hidden_states": inputs["hidden_states"].flip(0) if rank == 1 else inputs["hidden_states"]}
        out["cfg_halves"] = _attempt(lambda: run(base, inputs=swapped))
        out["unchecked"] = _attempt(lambda: run({**base, "check_inputs": False}, inputs=seeded))
        out["weights"] = _attempt(lambda: run(base, model_seed=rank))
        options = {"inner": "eager", "ulysses_degree": 2} if rank == 0 else {"inner": "eager", "use_cfg_parallel": True}
        out["options"] = _attempt(lambda: run(options))
        side = 16 if rank == 0 else 24
        resized = {**inputs, "hidden_states": torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1))}
        out["shapes"] = _attempt(lambda: run(base, inputs=resized))
        scale = 2.0 if rank == 0 else 3.0  # a Python constant baked into the graph: other code per rank

        def scaled(x: torch.Tensor) -> torch.Tensor:
            q = x.view(2, 8, 2, 4).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2) * scale

        def graph() -> None:
            torch._dynamo.reset()
            torch.compile(scaled, backend="xdit", options=base, dynamic=False)(torch.ones(2, 8, 8))

        out["graph"] = _attempt(graph)
        bad = base if rank == 0 else {"inner": "eager", "ulysses_degree": 3}
        out["no_plan"] = _attempt(lambda: run(bad))
        out["after"] = _attempt(normal)  # the ranks are still in step after all of that
    return out


def test_ranks_that_disagree_raise_on_every_rank() -> None:
    results = run_spmd(_cases, 2, timeout=240)
    for rank, cases in enumerate(results):
        for name in ("normal", "after", "unchecked"):
            assert cases[name][0] == "ok", (rank, name, cases[name])
        for name, (kind, msg, seconds) in cases.items():
            assert seconds < 20, (rank, name, seconds)  # within seconds, not a timeout
            if name in ("normal", "after", "unchecked"):
                continue
            if name == "no_plan" and rank == 1:
                assert kind == "PlanError" and "ulysses_degree=2" in msg, msg  # its own error, with the fix
                continue
            assert kind == "RankMismatchError", (rank, name, kind, msg)
            if name in ("inputs", "cfg_halves"):
                assert "L['hidden_states']: rank 1 got different values than rank 0" in msg, msg
                assert "check_inputs=False" in msg, msg
            if name == "inputs":
                assert "encoder_hidden_states" in msg, msg
            if name == "weights":
                assert "parameters differ: rank 1's checksum of " in msg, msg
                assert "transformer_blocks.0." in msg or "pos_embed.proj.weight" in msg, msg
            if name == "options":
                assert "rank 1 has plan cfg=2 but rank 0 has ulysses=2" in msg, msg
            if name == "shapes":
                assert "shape (2, 4, 24, 24) torch.float32 on rank 1, (2, 4, 16, 16) torch.float32 on rank 0" in msg, msg
            if name == "graph":
                assert "the traced graphs differ: rank 1 has" in msg and "3.0" in msg and "2.0" in msg, msg
            if name == "no_plan":
                assert "rank 1 could not build its plan" in msg and "ulysses=3" in msg, msg


def test_weights_freed_on_some_ranks_do_not_disagree() -> None:
    """PipeFusion frees the other stages' weights: a missing checksum is no difference, another value is."""
    from xdit_compile.runtime.agreement import Fingerprint, explain

    def fp(weights: list[list[Any]]) -> Fingerprint:
        return Fingerprint({"ulysses": "2"}, "ulysses=2", "", [["L['x']", "(2, 4)", "torch.float32"]], "{}",
                           ["placeholder x"], weights)

    stage0 = fp([["a.weight", "(4,) torch.float32", 1.5], ["b.weight", "(4,) torch.float32", None]])
    stage1 = fp([["a.weight", "(4,) torch.float32", None], ["b.weight", "(4,) torch.float32", -2.0]])
    assert stage0.digest() != stage1.digest()
    assert explain([([0], stage0), ([1], stage1)]) is None
    other = fp([["a.weight", "(4,) torch.float32", 1.25], ["b.weight", "(4,) torch.float32", -2.0]])
    message = explain([([0], stage0), ([1, 2], other)])
    assert message is not None and "ranks [1, 2]'s checksum of a.weight is 1.25 but rank 0's is 1.5" in message
