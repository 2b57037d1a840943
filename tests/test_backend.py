"""The backend's contract: entry point, bad input, uneven shapes, a world of one, inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xdit_compile import ParallelPlan
from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import parity_many


def _attn(x: torch.Tensor) -> torch.Tensor:
    q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q * 0.5, q).transpose(1, 2).flatten(2)


def test_backend_is_registered_by_entry_point() -> None:
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("xdit").__name__ == "xdit_backend"


def test_degrees_without_process_group_fail_clearly() -> None:
    with pytest.raises(Exception, match="needs a torch.distributed process group"):
        torch.compile(_attn, backend="xdit", options={"ulysses_degree": 2})(torch.randn(2, 8, 8))


def test_no_degrees_no_group_runs_as_is() -> None:
    x = torch.randn(2, 8, 8)
    out = torch.compile(_attn, backend="xdit", options={"inner": "eager"})(x)
    torch.testing.assert_close(out, _attn(x))


def _bad_degrees() -> str:
    try:
        torch.compile(_attn, backend="xdit", options={"ulysses_degree": 4, "inner": "eager"})(torch.randn(2, 8, 8))
    except Exception as e:  # Dynamo wraps backend errors
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_degrees_that_do_not_match_world_size() -> None:
    msgs = run_spmd(_bad_degrees, 2, timeout=300)
    # Every rank's full message on failure (pytest would cut the list's repr short).
    assert all("do not multiply to the world size 2" in m and "ulysses=4" in m for m in msgs), "\n---\n".join(msgs)


def _uneven_and_odd(seq: int, heads: int, options: dict) -> tuple[float, str]:
    import xdit_compile

    torch.manual_seed(0)
    x = torch.randn(2, seq, heads * 4)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = xdit_compile.shard(x, 1)  # the tokens, whatever the seed search would prefer
        q = x.view(2, seq, heads, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q * 0.5, q).transpose(1, 2).flatten(2) * x

    xdit_compile.clear_reports()
    got = torch.compile(fn, backend="xdit", options={**options, "inner": "eager"})(x)
    return float((got - fn(x)).abs().max()), str(xdit_compile.reports()[-1])


@pytest.mark.parametrize("seq,heads,lowering", [(9, 2, "ulysses"), (8, 3, "ring"), (11, 3, "ring")])
def test_uneven_tokens_and_heads(seq: int, heads: int, lowering: str) -> None:
    results = run_spmd(_uneven_and_odd, 2, seq, heads, {"ulysses_degree": 2}, timeout=300)
    for err, report in results:
        assert err < 1e-5, report
        assert f"-> {lowering}" in report, report


def test_inductor_inner_compiler_is_exact() -> None:
    """A few cases through inductor (slow to compile here): Ulysses on a cross- and a joint-attention model."""
    results = run_spmd(parity_many, 2, "examples.tiny_dits:make", ["pixart", "flux"],
                       {"ulysses_degree": 2, "inner": "inductor"}, timeout=900)
    for per_rank in results:
        for r in per_rank:
            assert r.fallback is None and r.rel_err < 1e-4, r.report
            assert "-> ulysses" in r.report


def test_plan_object_option() -> None:
    plan = ParallelPlan.from_options({"plan": ParallelPlan(ring=2), "inner": "eager"})
    assert plan.ring == 2 and plan.inner == "eager"


def _graph_breaks_and_nonzero() -> tuple[float, int, float, str]:
    import xdit_compile

    torch.manual_seed(0)
    x = torch.randn(2, 8, 8)

    def broken(x: torch.Tensor) -> torch.Tensor:
        y = _attn(x) * 2
        torch._dynamo.graph_break()  # two graphs, each must shard inside and return whole tensors
        return _attn(y + x)

    def data_dependent(x: torch.Tensor) -> torch.Tensor:
        keep = torch.nonzero(x[0, :, 0] > 0).flatten()  # an unbacked SymInt length
        return _attn(x[:, keep]).sum(1) + _attn(x).sum(1)

    xdit_compile.clear_reports()
    out = torch.compile(broken, backend="xdit", options={"ulysses_degree": 2, "inner": "eager"})(x)
    err1 = float((out - broken(x)).abs().max())
    graphs = len(xdit_compile.reports())
    xdit_compile.clear_reports()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    out2 = torch.compile(data_dependent, backend="xdit", options={"ulysses_degree": 2, "inner": "eager"},
                         fullgraph=True)(x)
    err2 = float((out2 - data_dependent(x)).abs().max())
    return err1, graphs, err2, "\n".join(str(r) for r in xdit_compile.reports())


def test_graph_breaks_and_unbacked_symints() -> None:
    for err1, graphs, err2, report in run_spmd(_graph_breaks_and_nonzero, 2, timeout=300):
        assert graphs == 2 and err1 < 1e-5
        assert err2 < 1e-5, report
        assert "symbolic shapes" in report or "-> ulysses" in report or "data-dependent values:" in report, report
