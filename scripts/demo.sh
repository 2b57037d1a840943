#!/usr/bin/env bash
# Set up, then run the main job: tiny diffusers DiTs in parallel on CPU ranks (gloo),
# checked against one rank. 2 ranks with the automatic plan, then 4 ranks CFG x Ulysses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/torchrun --nproc-per-node 2 examples/run_parallel.py --ulysses 2 "$@"
.venv/bin/torchrun --nproc-per-node 4 examples/run_parallel.py --cfg --ulysses 2 "$@"
