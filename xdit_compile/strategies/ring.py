"""Ring: queries stay; K/V blocks pass around the ring, merged by their log-sum-exp.

    o = sdpa(q: S(2), k: S(2), v: S(2))
 -> o = ring_attention(q, k, v, group="1", kv_sizes=[32, 32])
"""

from __future__ import annotations

import torch.fx as fx

from ..placements import global_order, local_sizes, pieces
from ..runtime import attention as rt_attention
from .base import AttentionCall, AttentionRecord, Cost, Site, Strategy, emit_call, mask_of, shard_bytes


class Ring(Strategy):
    name = "ring"

    def why(self, site: Site) -> str:
        ax = site.axis
        if ax.ring == 1 and ax.ulysses == 1:  # an axis with no sequence sub-groups (batch, patches)
            return f"tokens sharded on the {ax.name} axis: ring over it"
        if ax.ulysses > 1 and not site.heads_divide_ulysses:
            return f"{site.heads_text()}: ring attention over all {ax.n} sequence ranks instead"
        return f"ring={ax.ring}"

    def cost(self, site: Site) -> Cost:
        # Every other rank's K/V block arrives once: (n-1) shifts of 2 * |k| / n.
        n = site.axis.n
        return Cost({"send_recv": 2.0 * site.k_bytes * (n - 1) / n}, n - 1)

    def report(self, site: Site) -> list[tuple[str, int]]:
        ax = site.axis
        return [("ring shift x(n-1)", shard_bytes(site.k, site.pk, ax.n, ax.rank) * 2)]

    def emit(self, graph: fx.Graph, site: Site, call: AttentionCall) -> tuple[fx.Node, AttentionRecord]:
        ax = site.axis
        q_sizes, kv_sizes = local_sizes(site.pq, ax.n), local_sizes(site.pk, ax.n)
        q_index = [i for s, ln in pieces(site.pq, ax.n, ax.rank) for i in range(s, s + ln)]
        node = emit_call(graph, rt_attention.ring_attention, call, {"group": ax.group, "kv_sizes": kv_sizes},
                         q_index, global_order(site.pk, ax.n))
        rec = AttentionRecord(self.name, AttentionCall(call.query, call.key, call.value, mask_of(node), call.scale,
                                                       call.enable_gqa),
                              self.why(site), call.mask, tuple(q_index), tuple(q_sizes), tuple(kv_sizes), site.pk,
                              ring_group=ax.group)
        return node, rec
