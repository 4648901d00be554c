"""steerlm as an installed tool: the built wheel (not editable) carries its configs and data, and
`steerlm pipeline ...` runs end to end from an empty directory.

The fresh venv gets only the wheel (`--no-deps --no-index`); its dependencies (torch, transformers, ...) are
borrowed from the test's own environment through a path file, so the test checks what the wheel ships without
downloading torch again. The check that the borrowed path cannot supply steerlm itself is an assertion below.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from steerlm.cli import COMMANDS

from conftest import PY, REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("steerlm-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    subprocess.run([PY, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies, appended after the venv's own site-packages (path files there are not executed, so the
    # editable steerlm of this checkout stays out)
    (Path(purelib) / "borrowed_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def test_wheel_ships_configs_data_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for c in COMMANDS.values():
        assert f"steerlm/conf/{c.config}.yaml" in names
    assert "steerlm/conf/model/tiny_llama.yaml" in names and "steerlm/conf/engine/megatron.yaml" in names
    assert "steerlm/bundled_data/oasst1/oasst1_validation_en.messages.jsonl.gz" in names
    assert "steerlm/bundled_data/helpsteer2/helpsteer2_train_first100.jsonl" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "steerlm = steerlm.cli:console_main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_steerlm_runs_the_pipeline_from_an_empty_directory(fresh_venv, tiny_model_dir, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    exe = fresh_venv / "bin" / "steerlm"
    env = {**os.environ, "PYTHONPATH": "", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    where = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", "import steerlm; print(steerlm.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(fresh_venv)), where  # the wheel's copy, not this checkout's

    usage = subprocess.run([str(exe), "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and all(name in usage.stdout for name in COMMANDS)
    bad = subprocess.run([str(exe), "train-dpo"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'train-dpo'" in bad.stderr

    # the bundled data by its config name, as the default configs use it: no path into any checkout
    oasst = "${bundled:oasst1/oasst1_validation_en.messages.jsonl.gz}"
    overrides = [f"model.path={tiny_model_dir}", "model.freeze_backbone=false", "run_dir=run",
                 "reward.engine.precision=fp32", "reward.train.max_steps=2", "reward.train.global_batch_size=8",
                 "reward.train.micro_batch_size=4", "reward.train.save_every=0",
                 f"label.input=[{{format: oasst, path: '{oasst}', max_rows: 120}}]", "label.engine.precision=fp32",
                 "label.attributes=null", "sft.engine.precision=fp32", "sft.pack_length=null", "sft.train.max_steps=2",
                 "sft.train.global_batch_size=4", "sft.model.lora.save_merged=false",
                 "evaluate.attributes=[verbosity]", "evaluate.n_prompts=2", "evaluate.levels=[0,4]",
                 "evaluate.generation.max_new_tokens=4", "evaluate.baselines.methods=[]"]
    proc = subprocess.run([str(exe), "pipeline", *overrides], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = work / "run"
    for stage in ("reward", "label", "sft", "evaluate"):
        assert json.loads((run / stage / "steerlm_stage.json").read_text())["stage"] == stage
    assert (run / "report.md").is_file()
    # the stages read the wheel's bundled files (the reward stage by its default config), wherever the command ran
    label_input = json.loads((run / "label" / "steerlm_stage.json").read_text())["config"]["input[0].path"]
    reward_data = json.loads((run / "reward" / "steerlm_stage.json").read_text())["config"]["data.train[0].path"]
    for path in (label_input, reward_data):
        assert path.startswith(str(fresh_venv)) and "/steerlm/bundled_data/" in path and Path(path).is_file(), path


def test_python_m_steerlm_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "steerlm", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "train-sft" in proc.stdout


def test_torchrun_dash_m_steerlm_runs_a_stage_at_world_2(tiny_model_dir, tmp_path):
    from conftest import HS2_SAMPLE

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "steerlm", "train-sft",
                           f"model.path={tiny_model_dir}", f"run_dir={tmp_path / 'sft'}", "train.max_steps=2",
                           f"data.train=[{{format: helpsteer2, path: {HS2_SAMPLE}}}]", "engine.precision=fp32",
                           "engine.strategy=ddp"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp" and summary["steps"] == 2
    assert (tmp_path / "sft" / "train_sft.log").is_file()  # Hydra's job keeps the recipe's name
