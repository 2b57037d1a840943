"""Peer measurements, run with the peers' interpreter (``benchmarks/.venv-peers/bin/python``).

    python -m benchmarks.peers SPECS.pt RESULTS.pt

Reads a list of job specs (``torch.save``), runs them on 2 gloo ranks with
``xdit_compile.testing.run_spmd`` (imported from this checkout: the harness needs only torch)
and saves the per-rank results. Kept apart from the main environment so that installing
para-attn / yunchang can never change the torch that xdit_compile is measured with.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from benchmarks.jobs import suite_job
    from xdit_compile.testing import run_spmd

    specs, out = torch.load(sys.argv[1], weights_only=False), sys.argv[2]
    world = max(s.get("world", 2) for s in specs)
    versions = {"torch": torch.__version__}
    for name in ("para_attn", "yunchang", "diffusers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            versions[name] = f"not importable: {type(e).__name__}: {e}"
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 900.0
    results = run_spmd(suite_job, world, specs, timeout=timeout, env={"OMP_NUM_THREADS": "1"})
    torch.save({"results": results, "versions": versions}, out)


if __name__ == "__main__":
    main()
