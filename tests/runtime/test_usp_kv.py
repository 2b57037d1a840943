"""USP's ring reads its K/V blocks out of the Ulysses all-to-all's receive buffer (``runtime/usp_layout.py``).

One spawn of 4 ranks (Ulysses 2 x Ring 2) checks, on projection-shaped (non-contiguous) inputs:
exactness against one rank's attention for even and uneven shards, cross-attention and GQA;
bit-identical results against the path before the change (one all-to-all for q/k/v, then the
ring's ``torch.stack`` of k and v); the copying ops one call issues (2 now, 3 before); and that
the bytes handed to the network are unchanged (q and k/v now travel in two all-to-alls).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from xdit_compile.runtime import attention as attn
from xdit_compile.runtime.collectives import group_rank, group_size, record_collectives
from xdit_compile.testing import run_spmd

_COPIES = {"cat", "stack", "clone", "copy_", "_to_copy", "_unsafe_view_copy"}


class _CountCopies(TorchDispatchMode):
    """Counts aten ops that materialise a copy of their input, with the elements each one writes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        if func._overloadpacket.__name__ in _COPIES:
            self.ops.append((func._overloadpacket.__name__, result.numel()))
        return result


def _before(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ug: str, rg: str, qs: list[int], ks: list[int],
            gqa: bool) -> torch.Tensor:
    """USP's body before the change: one all-to-all for q/k/v, the ring stacks k and v again."""
    u, r = group_size(ug), group_rank(rg)
    chunk = slice(r * u, (r + 1) * u)
    ring_sizes = [sum(ks[i * u:(i + 1) * u]) for i in range(group_size(rg))]
    q, k, v = attn._ulysses_scatter_heads(q, k, v, ug, qs[chunk], ks[chunk])
    out = attn._ring(q, k, v, rg, ring_sizes, None, None, gqa)
    return attn.gather_heads(out, ug, qs[chunk])


def _job(_: Any) -> dict[str, Any]:
    rank = dist.get_rank()
    # Rank = ring_index * 2 + ulysses_index: Ulysses groups {0,1}, {2,3}; ring groups {0,2}, {1,3}.
    groups = {}
    for ranks in ([0, 1], [2, 3], [0, 2], [1, 3]):
        g = dist.new_group(ranks)
        if rank in ranks:
            groups["u" if ranks[1] - ranks[0] == 1 else "r"] = g.group_name
    ug, rg = groups["u"], groups["r"]
    out: dict[str, Any] = {"err": {}, "diff_before": {}, "copies": {}, "records": {}}
    gen = torch.Generator().manual_seed(0)
    # (name, heads, kv heads, q sizes, kv sizes): four shards in sp order (ring-major).
    cases = [("self_even", 4, 4, [4, 4, 4, 4], [4, 4, 4, 4]), ("self_uneven", 4, 4, [5, 3, 2, 6], [5, 3, 2, 6]),
             ("cross", 4, 4, [3, 4, 4, 5], [2, 3, 4, 2]), ("gqa", 4, 2, [4, 3, 4, 5], [4, 3, 4, 5])]
    for name, h, hkv, qs, ks in cases:
        b, d = 2, 8
        q = torch.randn(b, sum(qs), h, d, generator=gen).transpose(1, 2)  # projection outputs, heads-major views
        k = torch.randn(b, sum(ks), hkv, d, generator=gen).transpose(1, 2)
        v = torch.randn(b, sum(ks), hkv, d, generator=gen).transpose(1, 2)
        gqa = h != hkv
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        qo, ko = sum(qs[:rank]), sum(ks[:rank])
        ql, kl, vl = q[:, :, qo:qo + qs[rank]], k[:, :, ko:ko + ks[rank]], v[:, :, ko:ko + ks[rank]]
        with _CountCopies() as new, record_collectives() as log:
            o = attn.usp_attention(ql, kl, vl, ulysses_group=ug, ring_group=rg, q_sizes=qs, kv_sizes=ks,
                                   enable_gqa=gqa)
        with _CountCopies() as old, record_collectives() as old_log:
            before = _before(ql, kl, vl, ug, rg, qs, ks, gqa)
        out["err"][name] = float((o - ref[:, :, qo:qo + qs[rank]]).abs().max())
        out["diff_before"][name] = float((o - before).abs().max())
        out["copies"][name] = (new.ops, old.ops)
        ring_kv = sum(ks[(rank // 2) * 2:(rank // 2) * 2 + 2])  # this ring index's K/V positions
        out["kv_block"] = out.get("kv_block", {})
        out["kv_block"][name] = 2 * b * (hkv // 2) * ring_kv * d
        out["records"][name] = ([tuple(x) for x in log], [tuple(x) for x in old_log])
    return out


_RESULTS: list[dict[str, Any]] = []


def _results() -> list[dict[str, Any]]:
    if not _RESULTS:
        _RESULTS.extend(run_spmd(_job, 4, None, env={"OMP_NUM_THREADS": "1"}))
    return _RESULTS


def test_exact_and_bit_identical_to_before() -> None:
    for res in _results():
        assert all(e < 1e-5 for e in res["err"].values()), res["err"]
        assert all(e == 0.0 for e in res["diff_before"].values()), res["diff_before"]


def test_ring_no_longer_copies_kv() -> None:
    for res in _results():
        for name, (new, old) in res["copies"].items():
            # Before: the heads-out send buffer (q, k, v), the ring's stack of k and v, the heads-back
            # copy (and the padding's cat when uneven). Now the ring's stack is gone: q and k/v are
            # stacked into their send buffers separately, the same elements as before.
            written_new, written_old = sum(n for _, n in new), sum(n for _, n in old)
            assert written_old - written_new == res["kv_block"][name], (name, new, old)
        new, old = res["copies"]["self_even"]
        # Element counts (b 2, heads 4 -> 2 per rank, 8 positions per ring chunk, d 8): the ring's
        # K/V stack (512) is gone; q's send buffer (256) and k/v's (512) replace the q/k/v one (768).
        assert new == [("stack", 256), ("stack", 512), ("clone", 256), ("clone", 256)], new
        assert old == [("stack", 768), ("stack", 512), ("clone", 256), ("clone", 256)], old


def test_bytes_unchanged() -> None:
    for res in _results():
        for name, (new, old) in res["records"].items():
            assert sum(r[1] for r in new) == sum(r[1] for r in old), (name, new, old)
            assert [r[0] for r in new if r[0] != "all_to_all"] == [r[0] for r in old if r[0] != "all_to_all"]
