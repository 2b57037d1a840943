#!/usr/bin/env bash
# Set up, then run the main job on CPU ranks (gloo), every parallel result checked against one rank:
#   1. tiny diffusers DiTs, Ulysses 2 on 2 ranks (parity, plan report)
#   2. the same, CFG 2 x Ulysses 2 on 4 ranks
#   3. one realistic shape (a PixArt layer at 1024 px's 4,096 tokens): 2-rank speedup over one rank
#   4. a picture: a tiny DiT trained on scikit-learn's digits, sampled with CFG 2 x Ulysses 2,
#      written next to the single-rank samples and their difference (results/demo/digits_cfg.png)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
echo "== 1/4 tiny DiTs, Ulysses 2 on 2 ranks"
.venv/bin/torchrun --nproc-per-node 2 examples/run_parallel.py --ulysses 2 "$@"
echo "== 2/4 tiny DiTs, CFG 2 x Ulysses 2 on 4 ranks"
.venv/bin/torchrun --nproc-per-node 4 examples/run_parallel.py --cfg --ulysses 2 "$@"
echo "== 3/4 a realistic shape on 2 ranks"
.venv/bin/torchrun --nproc-per-node 2 examples/realistic_speedup.py
echo "== 4/4 a picture: digits sampled with CFG 2 x Ulysses 2 on 4 ranks"
.venv/bin/torchrun --nproc-per-node 4 examples/digits_cfg.py
