#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py): on a GPU machine with only torch, transformers and peft
# preinstalled and no network, steerlm and its other needs come from wheels in .whl/ (git-ignored), placed there
# beforehand by scripts/fetch_gpu_wheels.sh. On a set-up checkout (.venv) nothing is installed.
#   bash scripts/gpu_check.sh                 # one H100/H200: ~0.5B and ~1.5B random Llamas, < 8 min
#   bash scripts/gpu_check.sh --smoke         # CPU, tiny model (CI)
#   bash scripts/gpu_check.sh --sizes 0.5b --steps 4 --out runs/gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${STEERLM_PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import steerlm, hydra" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "gpu_check: steerlm is not importable by $PY and .whl/ has no wheels: run scripts/fetch_gpu_wheels.sh first" >&2
    exit 2
  fi
  SITE=${STEERLM_SITE:-/tmp/steerlm_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_check.py "$@"
