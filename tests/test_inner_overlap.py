"""Inductor's communication reordering for the per-rank graphs (option ``reorder_comms``, ``inner_overlap.py``).

One spawn of 2 ranks compiles a small attention block (a self-attention over sharded tokens plus a
projection of a replicated context that does not depend on it) with inner inductor, Ulysses 2,
``reorder_comms`` off and on, and checks: both exact against one rank; the reordered program
issues more kernels between its collectives and their waits, in the same collective order;
inductor's global config is untouched (the patch is for the inner compile only); and no
deprecated collective warns (the per-call input check uses ``all_gather_single``).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xdit_compile.errors import PlanError
from xdit_compile.inner_overlap import PASSES, inductor_patches, overlap_slots
from xdit_compile.plan import ParallelPlan
from xdit_compile.testing import run_spmd


class _Block(nn.Module):
    """Self-attention over the tokens, plus a context projection the attention does not read."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ctx = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        return self.out(a) + self.ctx(context).mean(dim=1, keepdim=True)


def _job(_: Any) -> dict[str, Any]:
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _Block().eval()
    x, context = torch.randn(2, 32, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        ref = model(x, context)
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for on in (False, True):
            compiled = torch.compile(model, backend="xdit",
                                     options={"ulysses_degree": 2, "inner": "inductor", "reorder_comms": on})
            with torch.no_grad():
                y, codes = run_and_get_code(lambda: compiled(x, context))
                compiled(x, context)  # a second call: the per-call input check's all-gather runs again
            out[on] = {"err": float((y - ref).abs().max()), "slots": [s for c in codes for s in overlap_slots(c)]}
    out["deprecated"] = [str(w.message) for w in caught if "deprecated" in str(w.message) and "distributed" in str(w.message)]
    out["global"] = (config.reorder_for_compute_comm_overlap, list(config.reorder_for_compute_comm_overlap_passes))
    return out


_RESULTS: list[dict[str, Any]] = []


def _results() -> list[dict[str, Any]]:
    if not _RESULTS:
        _RESULTS.extend(run_spmd(_job, 2, None, timeout=900, env={"OMP_NUM_THREADS": "1"}))
    return _RESULTS


def test_option_and_patch() -> None:
    assert ParallelPlan().reorder_comms is True
    assert ParallelPlan.from_options({"reorder_comms": False}).reorder_comms is False
    with pytest.raises(PlanError, match="reorder_comms"):
        ParallelPlan.from_options({"reorder_comms": "yes"})
    assert inductor_patches(False) == {}
    assert inductor_patches(True) == {"reorder_for_compute_comm_overlap": True,
                                      "reorder_for_compute_comm_overlap_passes": list(PASSES)}


def test_reordered_program_is_exact_and_overlaps() -> None:
    for res in _results():
        assert res[False]["err"] < 1e-5 and res[True]["err"] < 1e-5, (res[False]["err"], res[True]["err"])
        off, on = res[False]["slots"], res[True]["slots"]
        # The same collectives in the same order (ranks must agree on it), more compute under them.
        assert [k for k, _ in off] == [k for k, _ in on] and off, (off, on)
        assert sum(n for _, n in on) > sum(n for _, n in off), (off, on)


def test_global_inductor_config_untouched() -> None:
    for res in _results():
        assert res["global"] == (False, [])


def test_no_deprecated_collective_warns() -> None:
    # torch 2.13 deprecates dist.all_gather_into_tensor and funcol.reduce_scatter_tensor (FutureWarning).
    for res in _results():
        assert not [m for m in res["deprecated"] if "torch.distributed" in m], res["deprecated"]
