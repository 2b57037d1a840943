"""The GPU check's CPU dry run: ``benchmarks/gpu_check.sh --dry-run`` (torchrun, 2 gloo ranks, tiny shapes).

Runs the same script a GPU machine runs (parity of every method that fits 2 ranks, PipeFusion
included, then the timing loop) and checks what it writes. Timings are not asserted (shared CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    methods = {r["method"] for r in summary["parity"]}
    for expected in ("Ulysses 2", "Ring 2", "CFG 2", "data parallel 2", "PipeFusion 2 (M=2, warmup all)",
                     "PipeFusion 2 (M=2, W=1, stale K/V)"):
        assert expected in methods, (expected, methods)
    assert all(r["ok"] for r in summary["parity"]), summary["parity"]
    assert summary["env"]["backend"] == "gloo" and summary["env"]["world"] == 2
    timed = summary["timings"]["rows"]
    assert len(timed) == 2 and all("speedup" in r for r in timed), timed  # Ulysses and PipeFusion
    assert summary["timings"]["kernel"] == "cpu_flash"
    assert "## Parity against one rank" in (tmp_path / "gpu_check.md").read_text()
