"""In-place writes into shards (``setitem``) and the aliasing check of the propagation.

Two kinds of tests: the propagation alone on graphs captured by Dynamo (fast, one process:
which plans are refused), and numerics on 2 gloo ranks (gathered result == eager, exact).
"""

from __future__ import annotations

import pytest
import torch

from xdit_compile import shard
from xdit_compile.graph import op_name
from xdit_compile.passes.propagate import WholeGraphFallback, propagate
from xdit_compile.placements import Shard
from xdit_compile.testing.harness import run_spmd

B, S, H, D = 2, 8, 4, 16


def capture(fn, *inputs) -> torch.fx.GraphModule:
    """The Dynamo graph of ``fn`` (placeholders carry fake values)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return graphs[0]


def seeded(gm: torch.fx.GraphModule, dim: int, n: int = 2):
    """Propagate with the first placeholder sharded on ``dim``."""
    ph = next(node for node in gm.graph.nodes if node.op == "placeholder")
    length = ph.meta["example_value"].shape[dim]
    return propagate(gm, n, {ph: Shard(dim, (length,), 1)})


# ------------------------------------------------------------------------------------ cases
def rope_strided_write(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan-style RoPE: a fresh buffer written at even/odd channels (not the token dim)."""
    q = x.view(B, S, H, D)
    x1, x2 = q.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(q)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.flatten(2) * 2


def joint_offset_write(img: torch.Tensor, txt: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """CogView4-style: RoPE written into the image part of a joint [text, image] sequence."""
    q = torch.cat([txt, img], dim=1)
    q[:, txt.shape[1]:] = q[:, txt.shape[1]:] * freqs.cos() + 1
    return q * 3


def write_strided_tokens(x: torch.Tensor) -> torch.Tensor:
    y = x * 1
    y[:, 0::2] = 0  # every other token: not a local write
    return y


def write_one_token(x: torch.Tensor) -> torch.Tensor:
    y = x * 1
    y[:, 1] = 5
    return y


def stale_view(x: torch.Tensor) -> torch.Tensor:
    y = x * 1
    first = y[:, 0]  # one token: a gathered copy on every rank
    y[..., 0] = 7  # written after the copy was taken: the view must see it
    return first + y.sum()


def write_through_view(x: torch.Tensor) -> torch.Tensor:
    y = x * 1
    z = y.view(B, S, H, D // H)
    z[..., 0] = 0  # a write through a view reaches y
    return y * 2


def complex_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Lumina/Qwen-style RoPE: view_as_complex, complex product, view_as_real."""
    q = x.view(B, S, H, D // H)
    z = torch.view_as_complex(q.float().reshape(B, S, H, -1, 2))
    f = torch.polar(torch.ones_like(freqs), freqs)[None, :, None, :]
    return torch.view_as_real(z * f).flatten(3).flatten(2)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "rope_strided_write": (rope_strided_write, lambda: (_x(B, S, D * H), _x(1, S, 1, D // 2), _x(1, S, 1, D // 2))),
    "joint_offset_write": (joint_offset_write, lambda: (_x(B, S, D), _x(B, 6, D, seed=1), _x(S, D, seed=2))),
    "write_strided_tokens": (write_strided_tokens, lambda: (_x(B, S, D),)),
    "write_one_token": (write_one_token, lambda: (_x(B, S, D),)),
    "stale_view": (stale_view, lambda: (_x(B, S, D),)),
    "write_through_view": (write_through_view, lambda: (_x(B, S, D),)),
    "complex_rope": (complex_rope, lambda: (_x(B, S, D), _x(S, D // H // 2, seed=3))),
}


# ------------------------------------------------------------------------------------ propagation only
def test_write_off_the_token_dim_is_local() -> None:
    fn, inputs = CASES["rope_strided_write"]
    prop = seeded(capture(fn, *inputs()), 1)
    writes = [n for n in prop.decisions if op_name(n) == "setitem"]
    assert len(writes) == 2
    for w in writes:
        assert w.args[0] not in prop.decisions[w].needs  # the buffer is written where it lives
        assert prop.decisions[w].local is None  # same index locally
    assert not prop.fallbacks


def test_write_on_segment_boundary_is_rewritten() -> None:
    fn, inputs = CASES["joint_offset_write"]
    prop = seeded(capture(fn, *inputs()), 1)
    (w,) = [n for n in prop.decisions if op_name(n) == "setitem"]
    assert prop.placements[w.args[0]] == Shard(1, (6, 8), 1)
    assert prop.decisions[w].local is not None  # global offset 6 -> this rank's local offset


@pytest.mark.parametrize("case", ["write_strided_tokens", "write_one_token", "stale_view"])
def test_unsafe_writes_refuse_the_plan(case: str) -> None:
    fn, inputs = CASES[case]
    with pytest.raises(WholeGraphFallback):
        seeded(capture(fn, *inputs()), 1)


# ------------------------------------------------------------------------------------ numerics on 2 ranks
def _marked(name: str):
    fn, _ = CASES[name]

    def run(x, *rest):
        return fn(shard(x, 1), *rest)

    return run


def numerics_job(names: list[str]) -> list[tuple[str, float, float, str | None, str]]:
    import xdit_compile

    out = []
    for name in names:
        torch._dynamo.reset()
        xdit_compile.clear_reports()
        inputs = CASES[name][1]()
        ref = CASES[name][0](*inputs)
        got = torch.compile(_marked(name), backend="xdit", options={"ulysses_degree": 2, "inner": "eager"},
                            fullgraph=True)(*inputs)
        reports = xdit_compile.reports()
        fallback = "; ".join(r.fallback for r in reports if r.fallback) or None
        out.append((name, float((got - ref).abs().max()), float(ref.abs().max()), fallback,
                    "\n".join(str(r) for r in reports)))
    return out


SHARDED = ["rope_strided_write", "joint_offset_write", "write_through_view", "complex_rope"]
REFUSED = ["write_strided_tokens", "write_one_token", "stale_view"]


@pytest.fixture(scope="module")
def numerics() -> dict[str, list]:
    results = run_spmd(numerics_job, 2, SHARDED + REFUSED, timeout=300)
    return {name: [rank[i] for rank in results] for i, name in enumerate(SHARDED + REFUSED)}


@pytest.mark.parametrize("case", SHARDED + REFUSED)
def test_numerics(case: str, numerics: dict[str, list]) -> None:
    for _, err, scale, fallback, report in numerics[case]:
        assert err <= 1e-5 * max(scale, 1.0), report
        if case in REFUSED:
            assert fallback is not None and ("in-place" in fallback or "copy" in fallback), report
        else:
            assert fallback is None, report
            assert "replicated " not in report, report
