"""scripts/gpu_check.sh --smoke: the GPU check's whole code path on CPU (tiny model, fp32), so it never rots.

The numbers it prints on CPU say nothing about GPUs; the test checks that every run finished, that the table and
JSON are written, and that the parameter count behind MFU is the model's real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_measurement(tmp_path):
    env = {**os.environ, "STEERLM_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "RESULT gpu_check_runs_ok=6/6 target=6/6"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    runs = {(r["what"], r["engine"], r["mode"]) for r in report["rows"]}
    assert runs == {("sft", "torch", "lora"), ("sft", "torch", "full"), ("sft", "megatron tp1", "lora"),
                    ("sft", "megatron tp1", "full"), ("rm step", "torch", "full"), ("generate", "steerlm", "greedy")}
    assert all(r["ok"] and r["tokens_per_s_per_gpu"] > 0 for r in report["rows"])
    assert all(r["mfu"] is None for r in report["rows"])  # no GPU, no peak FLOP/s: no MFU claimed
    assert "| tiny" in (tmp_path / "gpu_check.md").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "llama_tiny")
    assert report["rows"][0]["params"] == sum(p.numel() for p in model.parameters())


def test_gpu_check_refuses_to_run_without_a_gpu_unless_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr
