"""PipeFusion's stale K/V: a patch's queries attend over the layer's buffer, refreshed with the
patch's fresh K/V (the rest is the previous step's). PipeFusion picks it for its patch programs,
from the record of the ring / USP attention the core lowered on the patch axis::

    o = ring_attention(q_i, k_i, v_i, group="xdit-pf-patches", kv_sizes=..., mask=m)    record: ring
 -> o = stale_kv_attention(q_i, k_i, v_i, m', scale, gqa, "attn_1", [start, len, ...], None, None, qs, ks)
"""

from __future__ import annotations

from .base import Site
from .fill_kv import FillKV


class StaleKV(FillKV):
    name = "stale_kv"
    op = "stale_kv_attention"

    def why(self, site: Site) -> str:
        return "a patch over the layer's K/V buffer (stale for later patches)"
