"""Tensor parallel (``tensor_parallel_degree``, ``xdit_compile/tensor_parallel.py``) on tiny DiTs.

One spawn of 2 ranks (inner eager) runs every model under TP 2 and checks, on every rank:

* parity: the output matches single-rank eager within 1e-4 of its scale;
* memory: the parameters of the transformer blocks that the compiled graphs read, as this rank
  keeps them, are at most 0.55x of one rank's (the split weights are cut at compile time; the
  whole tensors' storage is freed). A branch whose output the model drops (the last joint
  block's text MLP in QwenImage) is in no graph: its weights stay whole and are not counted;
* traffic: bytes moved per call are within 1.10x of Megatron's minimum: one all-reduce of each
  attention's and each feed-forward's output per block (two per block for a plain block; PixArt
  adds cross-attention, Flux's single blocks have one fused output projection).

Test code may name model attributes (the blocks, the attention and feed-forward classes); the
package does not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest

from xdit_compile.testing.harness import run_spmd

MODELS = [("examples.tiny_dits:make", "pixart"), ("examples.tiny_dits:make", "sd3"),
          ("examples.tiny_dits:make", "flux"), ("examples.tiny_dits_more:make_more", "wan"),
          ("examples.tiny_dits_more:make_more", "qwenimage"), ("examples.tiny_dits_more:make_more", "cogview4")]
TOL = 1e-4
MAX_BLOCK_PARAMS = 0.55
MAX_TRAFFIC = 1.10


@dataclass(frozen=True)
class TpResult:
    name: str
    rank: int
    rel_err: float
    block_bytes: int
    block_bytes_whole: int
    moved: int  # bytes handed to collectives in one call
    megatron: int  # one all-reduce of every attention / feed-forward output in the blocks
    kinds: tuple[str, ...]
    report: str


_BLOCK = re.compile(r"(^|\.)\w*blocks\.\d+$")


def _sublayers(model) -> list:
    """Attention and feed-forward modules directly under a block (the row-parallel outputs)."""
    out = []
    for name, mod in model.named_modules():
        if not _BLOCK.search(name):
            continue
        for child in mod.children():
            cls = type(child).__name__
            if cls.endswith("Attention") or cls in ("FeedForward",):
                out.append(child)
    return out


def _tp_job(models: list[tuple[str, str]], options: dict) -> list[TpResult]:
    import torch
    import torch.distributed as dist

    import xdit_compile
    from xdit_compile.runtime.collectives import record_collectives
    from xdit_compile.tensor_parallel import kept_slices
    from xdit_compile.testing.parity import _first_tensor, load_factory

    os.environ.setdefault("XDIT_STRICT", "1")
    os.environ["XDIT_KEEP_GRAPHS"] = "1"
    from xdit_compile.backend import clear_graphs, compiled_graphs
    results = []
    for factory, name in models:
        xdit_compile.clear_reports()
        clear_graphs()
        torch._dynamo.reset()
        model, inputs = load_factory(factory)(name, batch=2, seed=0)
        sizes: list[int] = []

        def hook(_m, _a, out) -> None:
            outs = out if isinstance(out, tuple) else (out,)
            sizes.append(sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor)))

        handles = [m.register_forward_hook(hook) for m in _sublayers(model)]
        with torch.no_grad():
            ref = _first_tensor(model(**inputs, return_dict=False))
        for h in handles:
            h.remove()
        blocks = [(n, p) for n, p in model.named_parameters() if re.search(r"blocks\.\d+\.", n)]
        compiled = torch.compile(model, backend="xdit", options=dict(options))
        with torch.no_grad():
            compiled(**inputs, return_dict=False)
            with record_collectives() as log:
                out = _first_tensor(compiled(**inputs, return_dict=False))
        # Parameters the compiled graphs read (a block's branch whose output the model drops,
        # e.g. the last joint block's text MLP, is not in any graph and keeps its memory).
        read = {id(x) for _, gm, ex in compiled_graphs() for ph, x in
                zip([n for n in gm.graph.nodes if n.op == "placeholder"], ex) if ph.users}
        blocks = [(n, p) for n, p in blocks if id(p) in read or kept_slices(p)]
        whole = sum(p.numel() * p.element_size() for _, p in blocks)
        kept = 0
        for _, p in blocks:
            if p.untyped_storage().nbytes():
                kept += p.numel() * p.element_size()
            else:
                kept += sum(s.numel() * s.element_size() for s in kept_slices(p))
        results.append(TpResult(
            name, dist.get_rank(), float((out - ref).abs().max() / ref.abs().max()), kept, whole,
            sum(r.nbytes for r in log), sum(sizes), tuple(sorted({r.kind for r in log})),
            "\n".join(str(r) for r in xdit_compile.reports())))
    return results


# Run in the same spawn, after MODELS, for tests/models/test_tensor_parallel_errors.py (a spawn costs ~10 s a rank).
UNEVEN = ("examples.tiny_dits_tp:make", "pixart_3heads")
_cache: list[list[TpResult]] = []


def _results() -> list[list[TpResult]]:
    if not _cache:
        _cache.extend(run_spmd(_tp_job, 2, [*MODELS, UNEVEN], {"tensor_parallel_degree": 2, "inner": "eager"},
                               timeout=900))
    return _cache


@pytest.mark.parametrize("model", [m for _, m in MODELS])
def test_tp2_matches_single_rank_with_half_the_weights(model: str) -> None:
    names = [m for _, m in MODELS]
    for results in _results():
        r = results[names.index(model)]
        assert r.rel_err < TOL, f"{model} rank {r.rank}: rel err {r.rel_err}\n{r.report}"
        ratio = r.block_bytes / r.block_bytes_whole
        assert ratio <= MAX_BLOCK_PARAMS, f"{model} rank {r.rank}: block params {ratio:.3f}x of one rank's\n{r.report}"
        traffic = r.moved / r.megatron
        assert traffic <= MAX_TRAFFIC, (f"{model} rank {r.rank}: {r.moved} bytes moved = {traffic:.3f}x Megatron's "
                                        f"minimum {r.megatron} ({r.kinds})\n{r.report}")
