#!/usr/bin/env bash
# Create both benchmark environments; torch stays 2.13.0 in each (checked after every install).
#   .venv                      : xdit_compile + diffusers + matplotlib (the measured engine)
#   benchmarks/.venv-peers     : para-attn + yunchang + diffusers (the peers), same torch
# Usage: bash benchmarks/setup.sh        (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0

check_torch() {  # $1: python interpreter
  local v
  v=$("$1" -c 'import torch; print(torch.__version__.split("+")[0])')
  if [ "$v" != "$TORCH" ]; then
    echo "error: $1 has torch $v, expected $TORCH (an install replaced it)" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install "torch==$TORCH"
  .venv/bin/pip install -e ".[test]"
fi
.venv/bin/pip install -r benchmarks/requirements.txt
check_torch .venv/bin/python

PEERS=benchmarks/.venv-peers
if [ ! -x "$PEERS/bin/python" ]; then
  python3 -m venv "$PEERS"
fi
"$PEERS/bin/pip" install "torch==$TORCH"
check_torch "$PEERS/bin/python"
"$PEERS/bin/pip" install "torch==$TORCH" para-attn==0.3.38 yunchang==0.6.4 diffusers==0.42.1 transformers accelerate
check_torch "$PEERS/bin/python"
# xfuser is not installed: it does not import without an accelerator (see benchmarks/README.md).
echo "ok: .venv and $PEERS ready (torch $TORCH in both)"
