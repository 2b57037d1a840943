"""Graph breaks and data-dependent sizes: every graph split where its work is.

Models (``tests/adversarial/break_models.py``): a graph break between two blocks; a slice length
from ``mask.sum().item()``; tokens packed per sample into a fresh buffer at offsets read off the
mask (the buffer, filled in place, is sharded through a clone after its last write and a seed
on that activation). One spawn of 2 ranks runs them all under Ulysses 2 (eager inner).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import pytest

from xdit_compile.graph import written_inputs
from xdit_compile.passes.activation_seeds import activation_candidates
from xdit_compile.passes.choose_seeds import choose_seeds
from xdit_compile.passes.settle_writes import settle_writes
from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_many

FACTORY = "tests.adversarial.break_models:make"
MODELS = ["break_mid", "text_len", "packed"]
TOL = 1e-4
MAX_FLOPS = 0.60

_cache: list[list[ParityResult]] = []


def _results() -> list[list[ParityResult]]:
    if not _cache:
        _cache.extend(run_spmd(parity_many, 2, FACTORY, MODELS, {"ulysses_degree": 2, "inner": "eager"},
                               timeout=600))
    return _cache


@pytest.mark.parametrize("model", MODELS)
def test_break_model_exact_and_split(model: str) -> None:
    for results in _results():
        r = results[MODELS.index(model)]
        assert r.fallback is None, f"{model} rank {r.rank} fell back: {r.fallback}\n{r.report}"
        assert r.rel_err < TOL, f"{model} rank {r.rank}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"
        assert "-> ulysses" in r.report, f"{model}: no attention lowered to Ulysses\n{r.report}"
        assert r.flops <= MAX_FLOPS * r.ref_flops, (
            f"{model} rank {r.rank}: {r.flops} FLOPs vs {r.ref_flops} on one rank\n{r.report}")


def test_packed_buffer_is_sharded_as_an_activation() -> None:
    """The joint blocks of ``packed`` run on a buffer made in the graph: the report names it."""
    for results in _results():
        r = results[MODELS.index("packed")]
        assert "activation clone" in r.report, r.report


def _packed_graph() -> fx.GraphModule:
    """A buffer filled in place at per-sample offsets, then read by a big matmul (no spawn)."""

    def f(img: torch.Tensor, txt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        buf = img.new_zeros(2, 72, 64)
        buf[0, :8] = txt[0]
        buf[0, 8:] = img[0]
        buf[1, :5] = txt[1, :5]
        buf[1, 5:69] = img[1]
        return (buf @ w).relu() @ w.t() + buf

    graphs: list[fx.GraphModule] = []

    def record(gm: fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=record, fullgraph=True)(torch.randn(2, 64, 64), torch.randn(2, 8, 64), torch.randn(64, 256))
    gm = graphs[0]
    return gm


def test_settle_writes_clones_after_the_last_write() -> None:
    gm = _packed_graph()
    assert settle_writes(gm) == 1
    nodes = list(gm.graph.nodes)
    clone = next(n for n in nodes if n.op == "call_method" and n.target == "clone")
    writes = [i for i, n in enumerate(nodes) if written_inputs(n)]
    assert nodes.index(clone) > max(writes)
    # Every read after the writes goes through the clone; the writes still target the buffer.
    buf = clone.args[0]
    assert all(nodes.index(u) <= max(writes) for u in buf.users if u is not clone)
    out = gm(torch.ones(2, 64, 64), torch.ones(2, 8, 64), torch.ones(64, 256))
    assert out[0].shape == (2, 72, 64)


def test_seed_search_shards_the_settled_buffer() -> None:
    gm = _packed_graph()
    from xdit_compile.passes.propagate import propagate

    before = activation_candidates(gm, propagate(gm, 2, {}), 2, False, 2)
    assert all(n.op != "call_function" or "new_zeros" not in str(n.target) for n, _ in before), (
        "a buffer written after it is made is no candidate (its slice would miss the writes)")
    settle_writes(gm)
    prop = choose_seeds(gm, 2, False, 2)
    assert any(n.op == "call_method" and n.target == "clone" for n in prop.seeds), prop.seeds
