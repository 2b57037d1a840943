"""Local: the attention's tokens are whole on every rank (its shard is on a batch-like dim, or
the keys are replicated for cross-attention): each rank attends to its part, no communication.
The call stays as written; the record says so."""

from __future__ import annotations

import torch.fx as fx

from .base import AttentionCall, AttentionRecord, Site, Strategy


class Local(Strategy):
    name = "local"
    auto = False  # chosen by the attention rule (``Decision.attention is AttentionRole.LOCAL``), not by ``lower``

    def why_not(self, site: Site) -> str | None:
        return "the tokens are sharded: every query needs every rank's keys"

    def why(self, site: Site) -> str:
        return "no communication"

    def emit(self, graph: fx.Graph, site: Site, call: AttentionCall) -> tuple[fx.Node, AttentionRecord]:
        raise NotImplementedError("local attention keeps its call: use Local.record")

    def record(self, call: AttentionCall) -> AttentionRecord:
        return AttentionRecord(self.name, call, self.why(None))  # type: ignore[arg-type]
