"""Rules for spatially sharded feature maps: convolution halos, GroupNorm statistics, upsampling.

Two ways, as STYLE.md asks:

* on hand-built fx graphs (no processes): the placement each rule gives, which ops fall back
  to replicated and why, and the nodes the lowering inserts (one halo per windowed conv, one
  global-statistics GroupNorm per group_norm);
* numerics on real gloo ranks: small modules compiled with backend "xdit" on 3 ranks (uneven
  rows on purpose), whose gathered output must equal the module on one rank (fp32, within
  1e-5 of the output scale), with no conv / group_norm / upsampling replicated.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from xdit_compile.axis import Axis
from xdit_compile.graph import op_name
from xdit_compile.passes.lower import lower
from xdit_compile.passes.propagate import propagate
from xdit_compile.placements import Replicate, Shard, shard
from xdit_compile.testing import run_spmd


# ------------------------------------------------------------------ modules (shared by both ways)
class Stack(nn.Module):
    """Every op the rules cover, at stride 1 (works on uneven shards)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(4, c, eps=1e-6)
        self.dilated = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(c, c, (5, 3), padding="same")
        self.pointwise = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv_in(x)))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.dilated(h) + h
        h = self.norm(self.same(h))
        return self.pointwise(h)


class Strided(nn.Module):
    """Stride-2 convolutions (with a halo and as a patch embedding) and upsampling by size."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.patch = nn.Conv2d(c, c, 2, stride=2)
        self.norm = nn.GroupNorm(2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.down(x))
        h = F.interpolate(h, size=(h.shape[2] * 2, h.shape[3] * 2), mode="nearest-exact")
        return self.patch(h)


class Unsupported(nn.Module):
    """Bilinear upsampling and a transposed conv: correct through the replicated fallback."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear")
        return self.conv(h)


MODELS = {"stack": (Stack, (2, 8, 7, 5)), "strided": (Strided, (1, 8, 12, 6)), "unsupported": (Unsupported, (1, 8, 6, 4))}


# ------------------------------------------------------------------ hand-built graphs
class _IntoModules(fx.Tracer):
    """Trace through nn.Conv2d / nn.GroupNorm into the functional calls Dynamo would show."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False


def _traced(model: nn.Module, shape: tuple[int, ...]) -> tuple[fx.GraphModule, fx.Node]:
    gm = fx.GraphModule(model, _IntoModules().trace(model))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(mode.from_tensor(torch.zeros(shape)))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return gm, x


def _by_op(gm: fx.GraphModule, prop: Any, name: str) -> list[Any]:
    return [prop.placements[n] for n in gm.graph.nodes if op_name(n) == name]


def test_stride_one_ops_keep_an_uneven_row_shard() -> None:
    gm, x = _traced(Stack(), (2, 8, 7, 5))
    prop = propagate(gm, 3, {x: shard(2, 7)})
    assert not prop.fallbacks, prop.fallbacks
    convs = _by_op(gm, prop, "conv2d")
    assert convs[0] == shard(2, 7)
    # Nearest x2 of 7 rows over 3 ranks (3, 2, 2) -> every unit doubles: S(2:7x2).
    assert _by_op(gm, prop, "interpolate") == [Shard(2, (7,), 2)]
    assert all(p == Shard(2, (7,), 2) for p in convs[1:])
    assert _by_op(gm, prop, "group_norm") == [shard(2, 7), Shard(2, (7,), 2)]
    rewritten = [op_name(n) for n in gm.graph.nodes if n in prop.decisions and prop.decisions[n].local is not None]
    # 3x3, dilated and "same" convs need halos and the two norms global statistics; 1x1 does not.
    assert rewritten == ["conv2d", "group_norm", "conv2d", "conv2d", "group_norm"]


def test_strided_conv_halves_an_even_shard_and_size_is_rewritten() -> None:
    gm, x = _traced(Strided(), (1, 8, 12, 6))
    prop = propagate(gm, 3, {x: shard(2, 12)})
    assert not prop.fallbacks, prop.fallbacks
    assert _by_op(gm, prop, "conv2d") == [shard(2, 6), shard(2, 6)]
    assert _by_op(gm, prop, "interpolate") == [shard(2, 12)]


def test_unsupported_cases_fall_back_with_a_reason() -> None:
    gm, x = _traced(Unsupported(), (1, 8, 6, 4))
    prop = propagate(gm, 2, {x: shard(2, 6)})
    reasons = {n.name: why for n, why in prop.fallbacks}
    assert "bilinear" in reasons["interpolate"]
    assert isinstance(_by_op(gm, prop, "interpolate")[0], Replicate)
    # Channels sharded: a conv mixes every channel, a GroupNorm's group would be split.
    gm, x = _traced(Stack(), (2, 8, 7, 5))
    prop = propagate(gm, 2, {x: shard(1, 8)})
    reasons = {n.name: why for n, why in prop.fallbacks}
    assert "channels" in reasons["conv2d"]
    # Stride 2 over odd rows per rank cannot tile: replicated, said so.
    gm, x = _traced(Strided(), (1, 8, 6, 6))
    prop = propagate(gm, 2, {x: shard(2, 6)})
    assert "stride" in dict((n.name, w) for n, w in prop.fallbacks)["conv2d"]


def test_lowering_inserts_one_halo_per_windowed_conv_and_global_norms() -> None:
    gm, x = _traced(Stack(), (2, 8, 7, 5))
    prop = propagate(gm, 3, {x: shard(2, 7)})
    lower(gm, prop, Axis("sp", 3, 1, "unused"))
    names = [op_name(n) for n in gm.graph.nodes]
    assert names.count("xdit_halo") == 3  # conv_in, dilated, same
    assert names.count("xdit_group_norm") == 2 and "group_norm" not in names
    halos = [n for n in gm.graph.nodes if op_name(n) == "xdit_halo"]
    assert [(n.args[1], n.args[2], n.args[3]) for n in halos] == [(2, 1, 1), (2, 2, 2), (2, 2, 2)]
    convs = [n for n in gm.graph.nodes if op_name(n) == "conv2d"]
    # The sharded dim's padding moved into the halo; the other dim keeps its own.
    assert [tuple(n.args[4]) for n in convs[:3]] == [(0, 1), (0, 2), (0, 1)]


# ------------------------------------------------------------------ numerics on 3 ranks
def _numerics() -> dict[str, Any]:
    import xdit_compile

    out = {}
    for name, (cls, shape) in MODELS.items():
        torch.manual_seed(0)
        model = cls().eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x)
            xdit_compile.clear_reports()
            got = torch.compile(model, backend="xdit", options={"ring_degree": 3, "inner": "eager"})(x)
        report = xdit_compile.reports()[-1]
        replicated = [(node, op) for ax in report.axes for node, op, _ in ax.replicated]
        out[name] = (float((got - ref).abs().max() / ref.abs().max()), replicated, report.axes[0].seeds)
    return out


@pytest.fixture(scope="module")
def numerics() -> list[dict[str, Any]]:
    return run_spmd(_numerics, 3, timeout=240.0, env={"XDIT_STRICT": "1"})


@pytest.mark.parametrize("name", ["stack", "strided", "unsupported"])
def test_sharded_modules_equal_one_rank(numerics: list[dict[str, Any]], name: str) -> None:
    for rank, r in enumerate(numerics):
        err, replicated, seeds = r[name]
        assert err < 1e-5, f"rank {rank} {name}: relative error {err}"
        assert seeds and "S(" in seeds[0][1], seeds
        ops = {op for _, op in replicated}
        if name == "unsupported":
            assert "interpolate" in ops
        else:
            assert not ops & {"conv2d", "group_norm", "interpolate"}, replicated
