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

The same spawn runs the Flux pipeline (8 steps, ``examples/tiny_pipelines.py``) with its
transformer under TP 2: every rank's image equals the single-rank image within 1e-4 of its scale.

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
    attention: int = 0  # bytes of q, k, v and the output of every self/joint attention on one rank
    output: int = 0  # bytes of the model's output on one rank


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


class _Recorder:
    """Single-rank sizes for the traffic minimum: the output of every attention / feed-forward
    sublayer of a block (forward hooks) and q, k, v and the output of every self/joint attention
    (SDPA whose keys are as long as its queries; cross-attention against the text needs no
    all-to-all), summed over the calls made inside ``with recorder:``."""

    def __init__(self, model) -> None:
        import torch

        self.sizes: list[int] = []
        self.attention = 0
        self._modules = _sublayers(model)
        self._handles: list = []
        recorder = self

        class _Sdpa(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func is torch.nn.functional.scaled_dot_product_attention:
                    q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
                    if q.shape[-2] == k.shape[-2]:
                        recorder.attention += sum(t.numel() * t.element_size() for t in (q, k, v, out))
                return out

        self._mode = _Sdpa()

    def _hook(self, _m, _a, out) -> None:
        import torch

        outs = out if isinstance(out, tuple) else (out,)
        self.sizes.append(sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor)))

    def __enter__(self) -> "_Recorder":
        self._handles = [m.register_forward_hook(self._hook) for m in self._modules]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()


def _block_bytes(model) -> tuple[int, int]:
    """(bytes this rank keeps, bytes of one rank) of the blocks' parameters that compiled graphs read.

    A block's branch whose output the model drops (e.g. the last joint block's text MLP) is in no
    graph and keeps its memory: not counted.
    """
    from xdit_compile.backend import compiled_graphs
    from xdit_compile.tensor_parallel import kept_slices

    read = {id(x) for _, gm, ex in compiled_graphs() for ph, x in
            zip([n for n in gm.graph.nodes if n.op == "placeholder"], ex) if ph.users}
    blocks = [p for n, p in model.named_parameters() if re.search(r"blocks\.\d+\.", n)
              and (id(p) in read or kept_slices(p))]
    whole = sum(p.numel() * p.element_size() for p in blocks)
    kept = 0
    for p in blocks:
        if p.untyped_storage().nbytes():
            kept += p.numel() * p.element_size()
        else:
            kept += sum(s.numel() * s.element_size() for s in kept_slices(p))
    return kept, whole


PIPELINE = "pipeline"  # a (PIPELINE, name) case runs examples/tiny_pipelines.py's pipeline ``name``
PIPELINE_STEPS = 8


def _model_case(factory: str, name: str, options: dict) -> TpResult:
    import torch
    import torch.distributed as dist

    import xdit_compile
    from xdit_compile.runtime.collectives import record_collectives
    from xdit_compile.testing.parity import _first_tensor, load_factory

    model, inputs = load_factory(factory)(name, batch=2, seed=0)
    with torch.no_grad(), _Recorder(model) as rec:
        ref = _first_tensor(model(**inputs, return_dict=False))
    compiled = torch.compile(model, backend="xdit", options=dict(options))
    with torch.no_grad():
        compiled(**inputs, return_dict=False)
        with record_collectives() as log:
            out = _first_tensor(compiled(**inputs, return_dict=False))
    kept, whole = _block_bytes(model)
    return TpResult(
        name, dist.get_rank(), float((out - ref).abs().max() / ref.abs().max()), kept, whole,
        sum(r.nbytes for r in log), sum(rec.sizes), tuple(sorted({r.kind for r in log})),
        "\n".join(str(r) for r in xdit_compile.reports()), rec.attention, ref.numel() * ref.element_size())


def _pipeline_case(name: str, options: dict) -> TpResult:
    """The whole pipeline (``PIPELINE_STEPS`` steps, VAE uncompiled): the transformer compiled
    with ``options``; bytes moved and the minimum summed over every step of the compiled run
    (the first step compiles: its collectives are counted too)."""
    import sys

    import torch
    import torch.distributed as dist

    import xdit_compile
    from xdit_compile.runtime.collectives import record_collectives

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
    import tiny_pipelines

    pipe = tiny_pipelines.build(name)
    with _Recorder(pipe.transformer) as rec:
        ref = tiny_pipelines.generate(pipe, name, steps=PIPELINE_STEPS, progress=False)
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="xdit", options=dict(options))
    with record_collectives() as log:
        img = tiny_pipelines.generate(pipe, name, steps=PIPELINE_STEPS, progress=False)
    kept, whole = _block_bytes(model)
    return TpResult(
        f"{PIPELINE}:{name}", dist.get_rank(), float((img - ref).abs().max() / ref.abs().max()), kept, whole,
        sum(r.nbytes for r in log), sum(rec.sizes), tuple(sorted({r.kind for r in log})),
        "\n".join(str(r) for r in xdit_compile.reports()), rec.attention, ref.numel() * ref.element_size())


def _tp_job(models: list[tuple[str, str]], options: dict) -> list[TpResult]:
    import torch

    import xdit_compile

    os.environ.setdefault("XDIT_STRICT", "1")
    os.environ["XDIT_KEEP_GRAPHS"] = "1"
    from xdit_compile.backend import clear_graphs

    results = []
    for factory, name in models:
        xdit_compile.clear_reports()
        clear_graphs()
        torch._dynamo.reset()
        if factory == PIPELINE:
            results.append(_pipeline_case(name, options))
        else:
            results.append(_model_case(factory, name, options))
    return results


# Run in the same spawn, after MODELS, for tests/models/test_tensor_parallel_errors.py (a spawn costs ~10 s a rank).
UNEVEN = ("examples.tiny_dits_tp:make", "pixart_3heads")
PIPE = (PIPELINE, "flux")  # the Flux pipeline, 8 steps, in the same spawn (before UNEVEN, which runs last)
_cache: list[list[TpResult]] = []


def _results() -> list[list[TpResult]]:
    if not _cache:
        _cache.extend(run_spmd(_tp_job, 2, [*MODELS, PIPE, UNEVEN], {"tensor_parallel_degree": 2, "inner": "eager"},
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


def test_tp2_flux_pipeline_produces_the_single_rank_image() -> None:
    """The Flux pipeline (8 steps, tiny random parts, prompt embeddings passed in), its transformer
    under TP 2: every rank's image equals the single-rank image within 1e-4 of its scale."""
    for results in _results():
        r = results[len(MODELS)]
        assert r.name == f"{PIPELINE}:flux"
        assert r.rel_err < TOL, f"rank {r.rank}: image rel err {r.rel_err}\n{r.report}"
        assert "all_reduce" in r.kinds, f"rank {r.rank}: no all-reduce, TP not applied ({r.kinds})\n{r.report}"
        ratio = r.block_bytes / r.block_bytes_whole
        assert ratio <= MAX_BLOCK_PARAMS, f"rank {r.rank}: block params {ratio:.3f}x of one rank's\n{r.report}"
