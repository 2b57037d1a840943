"""PipeFusion's fill: exact attention over the full sequence that keeps the layer's K/V.

PipeFusion picks it (never ``lower``) for the full-sequence steps, from the record the
sequence strategy left on the node (groups, sizes) or from a plain SDPA call::

    o = ulysses_attention(q, k, v, group=g, q_sizes=s, kv_sizes=s, mask=m)     record: ulysses, g
 -> o = fill_kv_attention(q, k, v, m, scale, gqa, "attn_1", [0, 32, 32, 32], g, None, s, s)

The op is ``torch.ops.xdit_pipefusion.fill_kv_attention`` (``pipefusion/kv.py`` registers it,
with the K/V store it writes); it is looked up by name so this module imports no PipeFusion code.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from ..errors import PassError
from .base import AttentionCall, AttentionRecord, Cost, Site, Strategy


def kv_op(name: str) -> Any:
    """``torch.ops.xdit_pipefusion.<name>.default``; registered when ``pipefusion.kv`` is imported."""
    try:
        return getattr(torch.ops.xdit_pipefusion, name).default
    except (AttributeError, RuntimeError):
        raise PassError(f"attention op xdit_pipefusion::{name} is not registered: import "
                        "xdit_compile.pipefusion before lowering to PipeFusion's K/V attention") from None


class FillKV(Strategy):
    name = "fill_kv"
    op = "fill_kv_attention"
    auto = False

    def why_not(self, site: Site) -> str | None:
        return "PipeFusion's own: only its programs, which keep K/V buffers, use it"

    def why(self, site: Site) -> str:
        return "full sequence; keeps the layer's K/V"

    def cost(self, site: Site) -> Cost:
        # Ulysses all-to-alls (q, k, v and the output) inside, K/V all-gathered over the ring.
        ax = site.axis
        u, r = ax.ulysses, ax.ring
        parts = {"all_to_all": 4.0 * site.q_bytes * (u - 1) / u / ax.n, "all_gather": 2.0 * site.k_bytes * (r - 1) / r}
        return Cost(parts, (2 if u > 1 else 0) + (1 if r > 1 else 0))

    def emit_kv(self, graph: fx.Graph, call: AttentionCall, layer: str, pieces: Sequence[int],
                ulysses_group: str | None, ring_group: str | None, q_sizes: Sequence[int],
                kv_sizes: Sequence[int]) -> tuple[fx.Node, AttentionRecord]:
        """Insert the op (at the insertion point) for ``layer``; see ``pipefusion/kv.py`` for the
        meaning of ``pieces`` and the sizes."""
        node = graph.call_function(kv_op(self.op), (
            call.query, call.key, call.value, call.mask, call.scale, call.enable_gqa, layer, list(pieces),
            ulysses_group, ring_group, list(q_sizes), list(kv_sizes)))
        rec = AttentionRecord(self.name, call, self.why(None), q_sizes=tuple(q_sizes),  # type: ignore[arg-type]
                              kv_sizes=tuple(kv_sizes), ulysses_group=ulysses_group, ring_group=ring_group)
        return node, rec
