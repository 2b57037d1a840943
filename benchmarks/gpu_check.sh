#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on every visible CUDA device (one rank per GPU, nccl):
# parity of every method on tiny models, then timings at a realistic shape.
# Results: benchmarks/results/gpu_check.md and gpu_check.json. Extra arguments go to gpu_check.py;
# `bash benchmarks/gpu_check.sh --dry-run` runs the CPU check (2 gloo ranks) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ " $* " == *" --dry-run "* ]]; then
  NPROC=2
else
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  if [ "$NPROC" -lt 2 ]; then
    echo "gpu_check.sh: $NPROC CUDA device(s) visible; the check needs at least 2 (or pass --dry-run)" >&2
    exit 2
  fi
fi
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" benchmarks/gpu_check.py "$@"
