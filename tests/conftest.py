"""Shared fixtures: a tiny random Llama (made once per session) and a CLI runner for recipes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    _load_script("make_tiny_model").make_tiny_model(out)
    return out


def run_recipe(recipe: str, *overrides: str, torchrun: int = 0, env: dict | None = None, check: bool = True,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run recipes/<recipe>.py through its real CLI (optionally under torchrun) from the repo root."""
    script = str(REPO / "recipes" / f"{recipe}.py")
    if torchrun:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun), script]
    else:
        cmd = [PY, script]
    proc = subprocess.run(cmd + list(overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{recipe} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def kill_9_after_checkpoint(recipe: str, overrides: list[str], run_dir: Path, step: int, timeout: int = 300) -> None:
    """Start a recipe and SIGKILL it as soon as `run_dir/checkpoints/latest` reaches `step`."""
    import signal
    import time

    cmd = [PY, str(REPO / "recipes" / f"{recipe}.py"), *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= f"step_{step:08d}":
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "model").exists()


def tiny_reward_overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A few-second reward run on the tiny model: fp32, small batches, no checkpoints unless asked."""
    return [f"model.path={model_dir}", "model.freeze_backbone=false", f"run_dir={run_dir}",
            "engine.precision=fp32", "train.max_steps=4", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.save_every=0", "eval.val_fraction=0.1", *extra]


HS2_SAMPLE = "data/helpsteer2/helpsteer2_train_first100.jsonl"


def tiny_sft_overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A few-second SFT run on the tiny model with the bundled HelpSteer2 rows (human labels), fp32."""
    return [f"model.path={model_dir}", f"run_dir={run_dir}", f"data.train=[{{format: helpsteer2, path: {HS2_SAMPLE}}}]",
            "engine.precision=fp32", "max_length=2048", "pack_length=null", "train.max_steps=3", "train.global_batch_size=8",
            "train.save_every=0", "model.lora.save_merged=false", *extra]


def error_lines(stderr: str) -> list[str]:
    """The `steerlm: error:` lines of a run's stderr (a user mistake prints exactly one, last)."""
    return [line for line in stderr.splitlines() if line.startswith("steerlm: error:")]


def assert_one_error(returncode: int, stderr: str, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one `steerlm: error:` line, holding every fragment. -> that line."""
    lines = error_lines(stderr)
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == lines[0], stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every output file under `directory` (relative path -> bytes): 'nothing finished was lost' compares two.
    Hydra's own record of each invocation (`.hydra/`, `<job>.log`) is rewritten by every run and left out."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and ".hydra" not in p.relative_to(directory).parts and p.suffix != ".log"}
