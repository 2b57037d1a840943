#!/usr/bin/env bash
# Create .venv with everything xdit_compile needs on a CPU machine (idempotent).
# torch is pinned and installed FIRST: an unpinned torch pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,demo]"
.venv/bin/python -c "import torch, diffusers, xdit_compile; print('setup ok: torch', torch.__version__, '| diffusers', diffusers.__version__)"
