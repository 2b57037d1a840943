"""PipeFusion: patch-level pipeline stages with stale K/V, derived from the graph.

    torch.compile(model, backend="xdit", options={"pipefusion_parallel_degree": 2,
                                                  "num_pipeline_patch": 4, "warmup_steps": 1})

Modules: ``cuts`` (where blocks end), ``policy`` (which stage gets which blocks), ``split``
(cutting a graph into stage programs), ``programs`` (full and per-patch programs), ``kv``
(K/V buffers, step/stream state, attention ops), ``p2p`` (transfers), ``driver`` (the
per-call schedule), ``stream`` (``run_steps``: the pipeline kept full across steps),
``entry`` (the backend). See docs/pipefusion.md.
"""

from __future__ import annotations

from .entry import PipeFusionReport, clear_reports, configure, pipefusion_backend, reports
from .kv import reset
from .p2p import P2PRecord, record_p2p
from .stream import run_steps

__all__ = ["P2PRecord", "PipeFusionReport", "clear_reports", "configure", "pipefusion_backend", "record_p2p",
           "reports", "reset", "run_steps"]
