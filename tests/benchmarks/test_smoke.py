"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` still runs end to end.

Benchmarks are not tests; this only checks that the script works, writes its results, and that
the communication it counts for Ulysses is the analytical minimum (an exact count, so it is
stable on a noisy machine, unlike any timing). The peers' venv is skipped (--no-peers): CI has none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-peers", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = (tmp_path / "RESULTS.md").read_text()
    assert "## 1. Communication" in results and "## 2. Speed" in results
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["errors"], summary["errors"]
    ulysses = [c for c in summary["comm"] if c["method"] == "Ulysses 2"]
    assert ulysses, summary["comm"]
    # Bytes handed to collectives per forward against 4 all-to-alls per self-attention layer + one
    # output gather: exact in the current backend; a redundant collective would push it past 1.10.
    assert 0.95 <= ulysses[0]["ratio"] <= 1.10, ulysses
    assert all(s["speedup"] > 0 for s in summary["speed"])
    assert (tmp_path / "speedup.png").exists()
    # The suite's own budget for --quick is 60 s; allow slack for a loaded CI machine.
    assert time.monotonic() - start < 180
