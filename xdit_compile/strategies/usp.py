"""USP: Ulysses inside each ring chunk, ring across the chunks (ring x ulysses ranks).

    o = sdpa(q: S(2), k: S(2), v: S(2))
 -> o = usp_attention(q, k, v, ulysses_group="2", ring_group="3", q_sizes=[16] * 4, kv_sizes=[16] * 4)
"""

from __future__ import annotations

import torch.fx as fx

from ..placements import global_order, local_sizes, pieces
from ..runtime import attention as rt_attention
from .base import AttentionCall, AttentionRecord, Cost, Site, Strategy, emit_call, mask_of
from .ring import Ring
from .ulysses import Ulysses


class Usp(Strategy):
    name = "usp"

    def why_not(self, site: Site) -> str | None:
        ax = site.axis
        if ax.ulysses == 1 or ax.ring == 1:
            return f"needs ulysses > 1 and ring > 1 (ulysses={ax.ulysses}, ring={ax.ring})"
        if not site.heads_divide_ulysses:
            return site.heads_text()
        return None

    def why(self, site: Site) -> str:
        return f"ulysses={site.axis.ulysses} x ring={site.axis.ring}"

    def cost(self, site: Site) -> Cost:
        ax = site.axis
        u, r = ax.ulysses, ax.ring
        a2a = 4.0 * site.q_bytes * (u - 1) / u / ax.n
        shift = 2.0 * site.k_bytes * (r - 1) / r
        return Cost({"all_to_all": a2a, "send_recv": shift}, 4 + r - 1)

    def report(self, site: Site) -> list[tuple[str, int]]:
        return Ulysses().report(site) + Ring().report(site)

    def emit(self, graph: fx.Graph, site: Site, call: AttentionCall) -> tuple[fx.Node, AttentionRecord]:
        ax = site.axis
        q_sizes, kv_sizes = local_sizes(site.pq, ax.n), local_sizes(site.pk, ax.n)
        # The queries this ring rank gathers: its U Ulysses ranks' shards, in rank order.
        q_index = [i for j in range(ax.ulysses) for s, ln in pieces(site.pq, ax.n, ax.ring_rank * ax.ulysses + j)
                   for i in range(s, s + ln)]
        node = emit_call(graph, rt_attention.usp_attention, call,
                         {"ulysses_group": ax.ulysses_group, "ring_group": ax.ring_group,
                          "q_sizes": q_sizes, "kv_sizes": kv_sizes},
                         q_index, global_order(site.pk, ax.n))
        rec = AttentionRecord(self.name, AttentionCall(call.query, call.key, call.value, mask_of(node), call.scale,
                                                       call.enable_gqa),
                              self.why(site), call.mask, tuple(q_index), tuple(q_sizes), tuple(kv_sizes), site.pk,
                              ulysses_group=ax.ulysses_group, ring_group=ax.ring_group)
        return node, rec
