#!/usr/bin/env bash
# Put in .whl/ (git-ignored) what scripts/gpu_check.sh installs on a GPU machine that has Python 3.12 with torch,
# transformers, peft, numpy, scipy, pyarrow, matplotlib, tqdm, pyyaml and safetensors, no network: steerlm itself
# (built from this checkout), Hydra and megatron-core. What the check does not run (the server, textstat, gguf)
# is left out.
#   bash scripts/fetch_gpu_wheels.sh            # then carry .whl/ to the GPU machine (~4 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p .whl
rm -f .whl/steerlm-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORM[@]}" -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 megatron-core==0.16.1
# hydra's parser runtime ships as a source distribution only: build its (pure Python) wheel here
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
du -sh .whl
