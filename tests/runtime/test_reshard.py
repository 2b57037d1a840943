"""Direct redistributions (``runtime/reshard.py``) on 2 gloo ranks: exact, one collective each, and
priced by the table the plan search uses.

Cases use uneven and multi-segment shards on purpose (7 units over 2 ranks; ``S(1:1+6)``, where
rank 1 holds nothing of the first segment). Each case checks the forward against slicing the
full tensor, that exactly one collective of the expected kind ran, and the backward against the
gradient convention of ``runtime/autograd.py``. One spawn runs every case.
"""

from __future__ import annotations

import torch

from xdit_compile.placements import PARTIAL, REPLICATE, Shard, pieces, shard
from xdit_compile.runtime import reshard
from xdit_compile.testing.harness import run_spmd

# (shape, source shard, destination shard)
ALL_TO_ALL = [
    ((2, 8, 6, 4), shard(1, 8), shard(2, 6)),  # even: frames -> positions
    ((2, 7, 5, 3), shard(1, 7), shard(2, 5)),  # uneven both ways
    ((3, 7, 4), Shard(1, (1, 6)), shard(0, 3)),  # multi-segment source, empty piece on rank 1
    ((4, 6, 8), shard(2, 8), Shard(1, (2, 4))),  # multi-segment destination
    ((2, 12, 5), Shard(1, (3,), 4), shard(2, 5)),  # units of 4 rows
]
REDUCE_SCATTER = [((2, 8, 6), shard(1, 8)), ((5, 3), shard(0, 5)), ((3, 7, 2), Shard(1, (1, 6)))]


def _local(x: torch.Tensor, p: Shard, n: int, rank: int) -> torch.Tensor:
    return torch.cat([x.narrow(p.dim, s, length) for s, length in pieces(p, n, rank)] or [x.narrow(p.dim, 0, 0)],
                     dim=p.dim)


def _job() -> list[tuple[str, float, list[str], float]]:
    import torch.distributed as dist

    from xdit_compile.runtime.collectives import record_collectives

    n, rank, group = dist.get_world_size(), dist.get_rank(), dist.group.WORLD.group_name
    out = []
    for i, (shape_, src, dst) in enumerate(ALL_TO_ALL):
        g = torch.Generator().manual_seed(i)
        x, w = torch.randn(shape_, generator=g), torch.randn(shape_, generator=g)
        mine = _local(x, src, n, rank).requires_grad_()
        with record_collectives() as log:
            y = reshard.reshard(mine, src.dim, reshard.layout(src, n), dst.dim, reshard.layout(dst, n), group)
        err = float((y - _local(x, dst, n, rank)).abs().max()) if y.numel() else 0.0
        # loss = sum(w * full result): this rank's share of the gradient is w's pieces under src.
        (y * _local(w, dst, n, rank)).sum().backward()
        grad_err = float((mine.grad - _local(w, src, n, rank)).abs().max()) if mine.numel() else 0.0
        out.append((f"all_to_all {src} -> {dst}", err, [r.kind for r in log], grad_err))
    for i, (shape_, dst) in enumerate(REDUCE_SCATTER):
        g = torch.Generator().manual_seed(100 + i)
        parts = [torch.randn(shape_, generator=g) for _ in range(n)]
        w = torch.randn(shape_, generator=g)
        mine = parts[rank].clone().requires_grad_()
        with record_collectives() as log:
            y = reshard.reduce_scatter(mine, dst.dim, reshard.layout(dst, n), group)
        err = float((y - _local(sum(parts), dst, n, rank)).abs().max()) if y.numel() else 0.0
        (y * _local(w, dst, n, rank)).sum().backward()
        grad_err = float((mine.grad - w).abs().max())  # a Partial value's gradient is complete
        out.append((f"reduce_scatter P -> {dst}", err, [r.kind for r in log], grad_err))
    return out


class Annotated(torch.nn.Module):
    """A plan with both direct changes, asked for by annotations: token-sharded ``x``, its Gram
    matrix summed over tokens (``Partial``) asked as rows (``P -> S``), and ``x`` asked as
    channels (``S(1) -> S(2)``)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import xdit_compile

        x = xdit_compile.shard(x, dim=1)
        g = xdit_compile.shard(x.transpose(1, 2) @ x, dim=1)
        y = xdit_compile.shard(x * 2, dim=2)
        return g * 3, y + 1


def _compiled() -> tuple[float, list[str], str]:
    """The lowering emits the direct collectives: run ``Annotated`` compiled on this rank."""
    import xdit_compile
    from xdit_compile.runtime.collectives import record_collectives

    xdit_compile.clear_reports()
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(7))
    ref = Annotated()(x)
    fn = torch.compile(Annotated(), backend="xdit", options={"ulysses_degree": 2, "inner": "eager"}, fullgraph=True)
    fn(x)
    with record_collectives() as log:
        out = fn(x)
    err = max(float((a - b).abs().max()) for a, b in zip(out, ref))
    return err, [r.kind for r in log], "\n".join(str(r) for r in xdit_compile.reports())


def _all() -> tuple[list[tuple[str, float, list[str], float]], tuple[float, list[str], str]]:
    return _job(), _compiled()


def test_direct_redistributions_exact_with_one_collective() -> None:
    results = run_spmd(_all, 2)
    for rank, (cases, (err, kinds, report)) in enumerate(results):
        assert err < 1e-5, f"rank {rank}: compiled Annotated off by {err}\n{report}"
        assert kinds.count("reduce_scatter") == 1 and kinds.count("all_to_all") == 1, f"{kinds}\n{report}"
        assert "all_reduce" not in kinds, f"{kinds}\n{report}"
        for name, err, kinds, grad_err in cases:
            assert err < 1e-6, f"rank {rank} {name}: forward off by {err}"
            assert grad_err < 1e-6, f"rank {rank} {name}: gradient off by {grad_err}"
            assert kinds == [name.split()[0]], f"rank {rank} {name}: ran {kinds}, expected one {name.split()[0]}"


def test_table_prices_each_change_by_its_collective() -> None:
    nbytes, n = 1024.0, 4
    s1, s2 = shard(1, 8), shard(2, 8)
    assert reshard.kind(s1, s2) == "all_to_all"
    assert reshard.received_bytes(s1, s2, nbytes, n) == nbytes * 3 / 16
    assert reshard.kind(PARTIAL, s1) == "reduce_scatter"
    assert reshard.received_bytes(PARTIAL, s1, nbytes, n) == nbytes * 3 / 4
    assert reshard.received_bytes(PARTIAL, REPLICATE, nbytes, n) == 2 * nbytes * 3 / 4
    assert reshard.received_bytes(s1, REPLICATE, nbytes, n) == nbytes * 3 / 4
    # A re-split of the same dim goes through R: a gather, then a free slice.
    assert reshard.kind(s1, Shard(1, (2, 6))) == "all_gather"
    assert reshard.received_bytes(REPLICATE, s1, nbytes, n) == 0.0
    assert reshard.kind(s1, s1) is None
