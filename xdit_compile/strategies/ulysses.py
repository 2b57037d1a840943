"""Ulysses: trade the sequence shard for a head shard (all-to-all), attend, trade back.

    o = sdpa(q: S(2), k: S(2), v: S(2))
 -> o = ulysses_attention(q, k, v, group="1", q_sizes=[32, 32], kv_sizes=[32, 32])
"""

from __future__ import annotations

import torch.fx as fx

from ..placements import global_order, local_sizes
from ..runtime import attention as rt_attention
from .base import AttentionCall, AttentionRecord, Cost, Site, Strategy, emit_call, mask_of, shard_bytes


class Ulysses(Strategy):
    name = "ulysses"

    def why_not(self, site: Site) -> str | None:
        ax = site.axis
        if ax.ulysses <= 1:
            return f"the {ax.name} axis has no Ulysses ranks to split heads over"
        if ax.ring > 1:
            return f"ring={ax.ring}: K/V must also travel around the ring"
        if not site.heads_divide_ulysses:
            return site.heads_text()
        return None

    def why(self, site: Site) -> str:
        return f"ulysses={site.axis.ulysses}"

    def cost(self, site: Site) -> Cost:
        # q, k, v in and the output back, each 1/n of q's size (self or joint attention: k, v as
        # large as q) of which (n-1)/n comes from other ranks. The runtime packs q, k, v into one
        # or two all-to-alls; the search counts four, as it always has (plans stay as they were).
        n = site.axis.n
        return Cost({"all_to_all": 4.0 * site.q_bytes * (n - 1) / n / n}, 4)

    def report(self, site: Site) -> list[tuple[str, int]]:
        ax = site.axis
        per_call = shard_bytes(site.q, site.pq, ax.n, ax.rank)
        # q, k, v travel in one all-to-all when their shards match (else q alone, then k and v
        # together); the output comes back in one more.
        packed = tuple(site.q.shape) == tuple(site.k.shape) and site.pq == site.pk
        return [("all_to_all x2 (qkv packed, out)" if packed else "all_to_all x3 (q, kv packed, out)", per_call)]

    def emit(self, graph: fx.Graph, site: Site, call: AttentionCall) -> tuple[fx.Node, AttentionRecord]:
        ax = site.axis
        q_sizes, kv_sizes = local_sizes(site.pq, ax.n), local_sizes(site.pk, ax.n)
        q_index = global_order(site.pq, ax.n)
        node = emit_call(graph, rt_attention.ulysses_attention, call,
                         {"group": ax.group, "q_sizes": q_sizes, "kv_sizes": kv_sizes},
                         q_index, global_order(site.pk, ax.n))
        rec = AttentionRecord(self.name, AttentionCall(call.query, call.key, call.value, mask_of(node), call.scale,
                                                       call.enable_gqa),
                              self.why(site), call.mask, tuple(q_index), tuple(q_sizes), tuple(kv_sizes), site.pk,
                              ulysses_group=ax.group)
        return node, rec
