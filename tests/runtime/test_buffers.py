"""Collective buffers reused between eager calls (``runtime/buffers.py``) and Ulysses on them.

In process: a pooled buffer comes back only when nothing holds a view of it, small buffers and
traced code are never pooled. One spawn of 2 ranks: Ulysses at a shape whose packed q/k/v is
pooled (self- and cross-attention, uneven shards) stays exact over repeated calls, reuses the
same send/receive storage, hands the same bytes to the network, and compiles (Dynamo
``fullgraph``) through the unpooled functional collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xdit_compile.context import current
from xdit_compile.runtime.attention import ulysses_attention
from xdit_compile.runtime.buffers import MIN_POOLED_BYTES, scratch
from xdit_compile.runtime.collectives import record_collectives
from xdit_compile.testing import run_spmd

_BIG = (MIN_POOLED_BYTES // 4) * 2  # float32 elements: 2 MiB


def test_scratch_reuses_only_free_buffers() -> None:
    cpu = torch.device("cpu")
    a = scratch("t.a", (_BIG,), torch.float32, cpu)
    ptr = a.data_ptr()
    held = a.view(2, -1)  # a view still alive: the next call must not hand out the same memory
    del a
    b = scratch("t.a", (_BIG,), torch.float32, cpu)
    assert b.data_ptr() != ptr
    del b, held
    c = scratch("t.a", (2, _BIG // 2), torch.float32, cpu)
    assert c.data_ptr() == ptr and c.shape == (2, _BIG // 2) and c.is_contiguous()
    del c
    other = scratch("t.b", (_BIG,), torch.float32, cpu)  # another role: its own buffer
    assert other.data_ptr() != ptr
    small = scratch("t.a", (8,), torch.float32, cpu)
    assert all(key[1] != 8 for key in current().buffers)  # small buffers are not kept
    assert small.shape == (8,)

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x: torch.Tensor) -> torch.Tensor:
        return scratch("t.traced", (_BIG,), x.dtype, x.device).fill_(1) + x

    before = len(current().buffers)
    assert float(traced(torch.zeros(()))[0]) == 1.0
    assert len(current().buffers) == before  # traced code allocates as usual


def _job(_: Any) -> dict[str, Any]:
    r = dist.get_rank()
    world = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"err": {}}
    # (name, batch, heads, head dim, q sizes, kv sizes): packed q/k/v above MIN_POOLED_BYTES.
    cases = [("self", 2, 4, 64, [512, 384], [512, 384]), ("cross", 2, 4, 64, [300, 212], [400, 100])]
    for name, b, h, d, qs, ks in cases:
        q = torch.randn(b, sum(qs), h, d, generator=g).transpose(1, 2)
        k = torch.randn(b, sum(ks), h, d, generator=g).transpose(1, 2)
        v = torch.randn(b, sum(ks), h, d, generator=g).transpose(1, 2)
        qo, ko = sum(qs[:r]), sum(ks[:r])
        ref = F.scaled_dot_product_attention(q, k, v)[:, :, qo:qo + qs[r]]
        ql, kl, vl = q[:, :, qo:qo + qs[r]], k[:, :, ko:ko + ks[r]], v[:, :, ko:ko + ks[r]]
        outs, storages = [], []
        for _ in range(3):
            with record_collectives() as log:
                o = ulysses_attention(ql, kl, vl, group=world, q_sizes=qs, kv_sizes=ks)
            outs.append(o)  # kept alive: outputs are fresh tensors, never pooled memory
            storages.append(sorted(buf.data_ptr() for buf, _ in current().buffers.values()))
        out["err"][name] = max(float((o - ref).abs().max()) for o in outs)
        out["distinct_outputs"] = len({o.data_ptr() for o in outs}) == len(outs)
        out[f"{name}_reused"] = storages[0] == storages[1] == storages[2] and len(storages[0]) > 0
        out[f"{name}_records"] = [tuple(x) for x in log]
    compiled = torch.compile(lambda q, k, v: ulysses_attention(q, k, v, group=world, q_sizes=[512, 384],
                                                               kv_sizes=[512, 384]), backend="eager", fullgraph=True)
    b, h, d, qs = 2, 4, 64, [512, 384]
    q, k, v = (torch.randn(b, sum(qs), h, d, generator=g).transpose(1, 2) for _ in range(3))
    sl = slice(sum(qs[:r]), sum(qs[:r]) + qs[r])
    ref = F.scaled_dot_product_attention(q, k, v)[:, :, sl]
    out["err"]["compiled"] = float((compiled(q[:, :, sl], k[:, :, sl], v[:, :, sl]) - ref).abs().max())
    return out


def test_ulysses_on_pooled_buffers_is_exact_and_reuses_them() -> None:
    results = run_spmd(_job, 2, None, env={"OMP_NUM_THREADS": "1"})
    for r, res in enumerate(results):
        assert all(e < 1e-5 for e in res["err"].values()), (r, res["err"])
        assert res["self_reused"] and res["cross_reused"], r
        assert res["distinct_outputs"], r
        # Bytes handed are those of the packed layout: [N, s, 3, B, H/N, D] and the output back.
        s = [512, 384][r]
        assert res["self_records"] == [("all_to_all", 3 * 2 * s * 4 * 64 * 4, 2), ("all_to_all", 2 * 4 * 896 * 64 * 4 // 2, 2)]
