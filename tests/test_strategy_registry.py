"""The attention strategy registry: choice and reasons, planning cost, and a strategy added from
outside the package (all-gather K/V, local queries) used and exact on 2 ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_compile import strategies
from xdit_compile.axis import Axis
from xdit_compile.errors import PassError
from xdit_compile.placements import Shard, local_sizes, pieces
from xdit_compile.runtime import redistribute as rt
from xdit_compile.strategies.base import AttentionCall, AttentionRecord, Cost, Site, Strategy, emit_call, mask_of
from xdit_compile.testing.harness import run_spmd
from xdit_compile.testing.parity import parity_many


def _site(ulysses: int = 1, ring: int = 1, heads: int = 4, name: str = "sp") -> Site:
    ax = Axis(name, ulysses * ring, 0, "1", ulysses=ulysses, ring=ring, ulysses_group="2", ring_group="3")
    return Site("attn", ax, heads, heads, q_bytes=1024.0, k_bytes=1024.0)


@pytest.mark.parametrize("ulysses,ring,heads,name,want", [
    (2, 1, 4, "sp", "ulysses"), (1, 2, 4, "sp", "ring"), (2, 2, 4, "sp", "usp"),
    (2, 1, 3, "sp", "ring"), (2, 2, 3, "sp", "ring"), (2, 1, 4, "batch", "ring"),
])
def test_choice_and_reasons(ulysses: int, ring: int, heads: int, name: str, want: str) -> None:
    site = _site(ulysses, ring, heads, name)
    chosen, rejected = strategies.choose(site)
    assert chosen.name == want
    assert all(reason for _, reason in rejected)
    if heads == 3:
        assert "3 heads (3 kv) do not divide ulysses=2" in chosen.why(site)


def test_planning_cost_is_unchanged() -> None:
    # What propagate charged before the registry: 4 * |q| * (n-1) / n^2 bytes and 4 collectives.
    for n in (2, 4, 8):
        cost = strategies.planning_cost("attn", 4096.0, 4096.0, n)
        assert cost.total_bytes == 4.0 * 4096 * (n - 1) / n / n and cost.collectives == 4


def test_register_and_unknown_name() -> None:
    names = [s.name for s in strategies.STRATEGIES]
    with strategies.registered(GatherAll(), before="ulysses"):
        assert strategies.choose(_site(2))[0].name == "gather_all"
    assert [s.name for s in strategies.STRATEGIES] == names
    with pytest.raises(PassError, match="no attention strategy named 'nope'"):
        strategies.get("nope")


class GatherAll(Strategy):
    """Toy: all-gather K/V over the axis, attend the local queries over all of them."""

    name = "gather_all"

    def why(self, site: Site) -> str:
        return "K/V all-gathered"

    def cost(self, site: Site) -> Cost:
        n = site.axis.n
        return Cost({"all_gather": 2.0 * site.k_bytes * (n - 1) / n}, 2)

    def report(self, site: Site) -> list[tuple[str, int]]:
        return [("all_gather x2 (k, v)", 0)]

    def emit(self, graph: fx.Graph, site: Site, call: AttentionCall) -> tuple[fx.Node, AttentionRecord]:
        ax, pk = site.axis, site.pk
        assert isinstance(pk, Shard) and isinstance(site.pq, Shard)
        sizes = local_sizes(pk, ax.n)
        order = None
        if len(pk.segments) > 1:  # pieces back in global order after the gather
            order, off = [], 0
            for r in range(ax.n):
                for start, length in pieces(pk, ax.n, r):
                    order.append((off, length, start))
                    off += length
        k = graph.call_function(rt.gather, (call.key, pk.dim, sizes, ax.group, order))
        v = graph.call_function(rt.gather, (call.value, pk.dim, sizes, ax.group, order))
        q_index = [i for s, ln in pieces(site.pq, ax.n, ax.rank) for i in range(s, s + ln)]
        node = emit_call(graph, _attend, AttentionCall(call.query, k, v, call.mask, call.scale, call.enable_gqa), {},
                         q_index, None)
        rec = AttentionRecord(self.name, AttentionCall(call.query, k, v, mask_of(node), call.scale, call.enable_gqa),
                              self.why(site), call.mask, tuple(q_index), tuple(local_sizes(site.pq, ax.n)),
                              tuple(sizes), pk, ring_group=ax.group)
        return node, rec


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Any = None, enable_gqa: bool = False,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def _job(names: list[str]) -> list[Any]:
    with strategies.registered(GatherAll(), before="ulysses"):
        return parity_many("examples.tiny_dits:make", names, {"ulysses_degree": 2, "inner": "eager"})


def test_toy_strategy_used_and_exact() -> None:
    names = ["pixart", "sd3"]  # self + cross attention; joint (two-segment) tokens
    for results in run_spmd(_job, 2, names, timeout=600):
        for name, r in zip(names, results):
            assert r.fallback is None, (name, r.fallback)
            assert r.report.count("-> gather_all") > 0 and "-> ulysses" not in r.report, r.report
            assert r.rel_err < 1e-4, (name, r.rel_err, r.report)
            kinds = {kind for kind, _, _ in r.collectives}
            assert "all_to_all" not in kinds and "all_gather" in kinds, r.collectives


def test_no_pass_names_a_strategy_op() -> None:
    """Only a strategy file (and the runtime that defines them) names the attention ops it emits:
    passes and PipeFusion read ``node.meta["xdit"]["strategy"]`` records, never call targets."""
    import ast
    from pathlib import Path

    import xdit_compile

    ops = {"ulysses_attention", "ring_attention", "usp_attention", "FILL", "STALE", "_SP_ATTENTION"}
    root = Path(xdit_compile.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        # testing/ builds validator samples of the rules for these ops, so it calls them.
        if rel.startswith(("strategies/", "runtime/", "testing/")) or rel == "pipefusion/kv.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in ops:
                found.append(f"{rel}:{node.lineno} {name}")
    assert not found, found
