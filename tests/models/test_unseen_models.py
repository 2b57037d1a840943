"""Unseen tiny DiTs (``examples/tiny_dits_more.py``) under Ulysses 2 on 2 ranks, against one rank.

The compiler was not written for these models; each brings a construct the core zoo lacks
(see the zoo's docstring). One spawn runs them all. Every model must match single-rank eager
within 1e-4 of its output's scale on every rank, run no graph wholly replicated, lower its
self/joint attention to Ulysses, and split the work (per-rank FLOPs well below one rank's).

    model          what it exercises
    wan            RoPE written into a fresh buffer at even/odd channels (strided setitem)
    cogview4       RoPE written into the image part of a joint sequence at offset text_len
    easyanimate    joint cat of text with patch rows (unit size mismatch), image-part setitem
    hunyuan_video  image-first joint sequence, key-padding mask built in the graph, setitem
    lumina_next    complex RoPE (view_as_complex), GQA by repeat, masks with query rows
    qwenimage      complex RoPE, joint [text, image] mask
    sana           ReLU linear attention (token sums -> Partial), depthwise 3x3 conv
    skyreels_v2    per-token modulation from per-frame timesteps, block-causal mask
    omnigen        one-token segments (an empty shard on a rank), graph breaks
    z_image        per-sample list inputs, pad_sequence, complex RoPE
    mochi          graph breaks (nonzero in a per-sample loop: Dynamo runs the attention processor
                   eagerly, outside every graph, so its attention stays whole on every rank)
    lumina2        graph breaks (.tolist()), tokens packed per sample into a fresh buffer at
                   offsets from the mask: sharded as an activation after its last write
"""

from __future__ import annotations

import pytest

from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import ParityResult, parity_many

FACTORY = "examples.tiny_dits_more:make_more"
MODELS = ["wan", "cogview4", "easyanimate", "hunyuan_video", "lumina_next", "qwenimage", "sana",
          "skyreels_v2", "omnigen", "z_image", "mochi", "lumina2"]
NO_SDPA_SELF_ATTENTION = {"sana", "mochi"}  # sana: linear attention (matmuls); mochi: outside every graph
TOL = 1e-4
MAX_FLOPS = 0.62  # per-rank FLOPs as a fraction of one rank's (ideal 0.5)
# Issue 10's bound for the models with graph breaks. Here Mochi runs with Dynamo's default config:
# per-rank FLOPs count the eager code between graphs (parity.py), and its attention runs there
# (measured 0.76; the report says so and names the fix). With the capture flags it is split at
# its data-dependent values and meets 0.60: tests/test_data_dependent.py (measured 0.50).
MAX_FLOPS_OF = {"mochi": 0.80, "lumina2": 0.60}

_cache: list[list[ParityResult]] = []


def _results() -> list[list[ParityResult]]:
    if not _cache:
        _cache.extend(run_spmd(parity_many, 2, FACTORY, MODELS, {"ulysses_degree": 2, "inner": "eager"},
                               timeout=900))
    return _cache


@pytest.mark.parametrize("model", MODELS)
def test_unseen_model_matches_single_rank(model: str) -> None:
    for results in _results():
        r = results[MODELS.index(model)]
        assert r.fallback is None, f"{model} rank {r.rank} fell back: {r.fallback}\n{r.report}"
        assert r.rel_err < TOL, f"{model} rank {r.rank}: max abs err {r.max_abs_err} (scale {r.scale})\n{r.report}"
        if model not in NO_SDPA_SELF_ATTENTION:
            assert "-> ulysses" in r.report, f"{model}: no attention lowered to Ulysses\n{r.report}"
        assert r.flops < MAX_FLOPS_OF.get(model, MAX_FLOPS) * r.ref_flops, (
            f"{model} rank {r.rank}: {r.flops} FLOPs vs {r.ref_flops} on one rank\n{r.report}")
        assert "WHOLE GRAPH" not in r.report, r.report
