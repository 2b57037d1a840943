"""The AutoencoderKL decoder compiled with backend "xdit" on 2 and 4 ranks (real gloo processes).

The sequence axis shards the latent's rows; convolutions exchange halos, GroupNorm all-reduces
its sums, the mid-block attention runs as ring attention (one head), upsampling keeps the
shards, and the image is gathered on every rank. Exact check: every rank's image equals the
single-rank decoder within 1e-4 of its scale (fp32). Work check: FLOPs of the per-rank graph
(convolutions, attention, linears) are at most 1/N of the single-rank decoder's plus 5%.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import pytest
import torch

from xdit_compile.testing import run_spmd

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _decode(latent: int) -> dict[str, Any]:
    sys.path.insert(0, EXAMPLES)
    import tiny_pipelines

    import xdit_compile
    from xdit_compile.backend import compiled_graphs
    from xdit_compile.runtime.collectives import record_collectives
    from xdit_compile.testing.parity import _flops

    torch.manual_seed(0)
    vae = tiny_pipelines.tiny_vae()
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_flops = _flops(lambda: vae.decoder(z))
        decoder = torch.compile(vae.decoder, backend="xdit", options={"inner": "eager"})
        decoder(z)
        with record_collectives() as log:
            out = decoder(z)
        flops = sum(_flops(lambda: gm(*args))[1] for _, gm, args in compiled_graphs())
    report = xdit_compile.reports()[-1]
    return {
        "err": float((out - ref).abs().max()), "scale": float(ref.abs().max()), "shape": tuple(out.shape),
        "flops": flops, "ref_flops": ref_flops, "kinds": Counter(r.kind for r in log),
        "replicated": [(node, op) for ax in report.axes for node, op, _ in ax.replicated],
        "seeds": [s for ax in report.axes for s in ax.seeds], "fallback": report.fallback,
    }


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    n = request.param
    env = {"XDIT_STRICT": "1", "XDIT_KEEP_GRAPHS": "1"}
    return n, run_spmd(_decode, n, 16, timeout=300.0, env=env)


def test_decoder_equals_single_rank_on_every_rank(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    n, results = ranks
    for rank, r in enumerate(results):
        assert r["fallback"] is None
        assert r["shape"] == (1, 3, 32, 32)
        assert r["err"] <= 1e-4 * r["scale"], f"{n} ranks, rank {rank}: error {r['err']} (scale {r['scale']})"


def test_latent_rows_are_sharded_and_nothing_runs_replicated(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    n, results = ranks
    for r in results:
        assert r["seeds"] == [("L['sample']", "S(2)")]
        assert r["replicated"] == []


def test_each_rank_does_a_1_over_n_share_of_the_work(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    n, results = ranks
    for rank, r in enumerate(results):
        ratio = r["flops"] / r["ref_flops"]
        assert ratio <= 1.05 / n, f"{n} ranks, rank {rank}: per-rank FLOPs are {ratio:.3f} of one rank's"


def test_collectives_are_halos_norm_sums_ring_and_one_gather(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    n, results = ranks
    for r in results:
        kinds = r["kinds"]
        assert kinds["halo"] == 15  # one per 3x3 convolution (the 1x1 shortcut needs none)
        assert kinds["all_reduce"] == 14  # one per GroupNorm
        assert kinds["all_gather"] == 1  # the image, assembled on every rank
