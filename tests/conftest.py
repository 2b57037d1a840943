"""Shared test setup: the repository root is importable (``examples`` holds the tiny models)."""

from __future__ import annotations

import os

# Children spawned by run_spmd inherit this; one thread per rank keeps 2-core machines sane.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# run_spmd keeps its ranks between calls (xdit_compile/testing/pool.py): each spawn costs seconds.
os.environ.setdefault("XDIT_SPMD_REUSE", "1")
