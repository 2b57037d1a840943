"""TP 2 x Ulysses 2 on 4 ranks (one spawn, inner eager): ``tp`` is lowered after ``sp``, so the
token shards' features are split; the Ulysses attention splits this rank's heads further.

Models: PixArt, SD3, Flux (``examples/tiny_dits.py``), Wan, and two from the unseen zoo
(QwenImage, CogView4; ``examples/tiny_dits_more.py``). Checks on every rank:

* parity with single-rank eager within 1e-4 of the scale;
* block parameters kept at most 0.55x of one rank's (the Ulysses group holds the same weight halves);
* bytes handed to collectives per call within 1.10x of the minimum, with T = tp, U = ulysses and
  single-rank sizes in bytes::

      minimum = sum(sublayer outputs) / U         Megatron: one all-reduce of each attention's and
                                                  each feed-forward's output per block, on the
                                                  token-sharded activation ([B, S/U, C] per rank)
              + sum(self/joint q, k, v, out) / (T U)   Ulysses: four all-to-alls per self/joint
                                                  attention of the local [B, H/T, S/U, D] shards
                                                  (cross-attention against the text: none)
              + output / U                        the output gathered once over the Ulysses ranks

  The excess is what the embeddings move (timestep MLP, modulation, text projection: small
  all-reduces and gathers), as under TP alone (tests/models/test_tensor_parallel.py).
"""

from __future__ import annotations

import pytest

from tests.models.test_tensor_parallel import MAX_BLOCK_PARAMS, MAX_TRAFFIC, TOL, TpResult, _tp_job
from xdit_compile.testing.harness import run_spmd

MODELS = [("examples.tiny_dits:make", "pixart"), ("examples.tiny_dits:make", "sd3"), ("examples.tiny_dits:make", "flux"),
          ("examples.tiny_dits_more:make_more", "wan"), ("examples.tiny_dits_more:make_more", "qwenimage"),
          ("examples.tiny_dits_more:make_more", "cogview4")]
T, U = 2, 2

_cache: list[list[TpResult]] = []


def _results() -> list[list[TpResult]]:
    if not _cache:
        _cache.extend(run_spmd(_tp_job, T * U, MODELS, {"tensor_parallel_degree": T, "ulysses_degree": U, "inner": "eager"},
                               timeout=900))
    return _cache


def minimum(r: TpResult) -> float:
    """Bytes a rank must hand to collectives per call under TP T x Ulysses U (the module docstring)."""
    return r.megatron / U + r.attention / (T * U) + r.output / U


@pytest.mark.parametrize("model", [m for _, m in MODELS])
def test_tp2_ulysses2_matches_single_rank(model: str) -> None:
    names = [m for _, m in MODELS]
    for results in _results():
        r = results[names.index(model)]
        assert r.rel_err < TOL, f"{model} rank {r.rank}: rel err {r.rel_err}\n{r.report}"
        assert "all_to_all" in r.kinds, f"{model} rank {r.rank}: no Ulysses all-to-all ({r.kinds})\n{r.report}"
        ratio = r.block_bytes / r.block_bytes_whole
        assert ratio <= MAX_BLOCK_PARAMS, f"{model} rank {r.rank}: block params {ratio:.3f}x of one rank's\n{r.report}"
        least = minimum(r)
        assert r.moved <= MAX_TRAFFIC * least, (
            f"{model} rank {r.rank}: {r.moved} bytes moved = {r.moved / least:.3f}x the minimum {least:.0f} "
            f"(all-reduces {r.megatron / U:.0f} + all-to-alls {r.attention / (T * U):.0f} + output gather "
            f"{r.output / U:.0f}; {r.kinds})\n{r.report}")
