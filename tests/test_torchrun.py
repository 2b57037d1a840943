"""The launcher path users take: torchrun, one node or two, and a rank that dies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_process_each() -> None:
    """Two torchrun agents meeting through a c10d rendezvous on 127.0.0.1, as two machines would."""
    port = _port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "xdit-test"]
    script = [str(ROOT / "examples" / "run_parallel.py"), "--models", "pixart,flux", "--ulysses", "2", "--repeat", "1"]
    nodes = [subprocess.Popen(TORCHRUN + common + [f"--node-rank={i}"] + script, cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outs)
    joined = "\n".join(outs)
    assert "parity: OK on every rank" in joined, joined
    assert "ulysses=2" in joined


def test_dead_rank_ends_the_job_with_an_error() -> None:
    start = time.time()
    proc = subprocess.run(TORCHRUN + ["--nproc-per-node", "2", "--master-port", str(_port()),
                                      str(ROOT / "examples" / "die_on_rank.py")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "rank 1 dies on purpose" in proc.stdout + proc.stderr
    assert time.time() - start < 240, "torchrun took too long to stop the surviving rank"


def test_pipefusion_loop_example() -> None:
    """``examples/pipefusion_loop.py``: run_steps equals the plain loop, within the stale-K/V bound."""
    proc = subprocess.run(TORCHRUN + ["--nproc-per-node", "2", "--master-port", str(_port()),
                                      str(ROOT / "examples" / "pipefusion_loop.py"), "--model", "flux", "--steps", "4"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "run_steps equals the plain loop bit for bit" in out and ": OK" in out, out
