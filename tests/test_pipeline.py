"""The one-command pipeline: planning (skip / resume / re-run and why), errors, and real tiny runs.

The real runs use recipes/pipeline.py on the tiny random model with every stage sized to seconds; the
embedded-default timing is measured outside the tests (README, Performance).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import HS2_SAMPLE, REPO, kill_9_after_checkpoint, run_recipe
from steerlm import pipeline
from steerlm.errors import ConfigError

OASST = "data/oasst1/oasst1_validation_en.messages.jsonl.gz"
DEFAULT = ("reward", "label", "sft", "evaluate")  # steerlm2 and ppo are opt-in


def tiny_overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """Every stage in seconds: tiny model, fp32, a few steps, 2 prompts x 2 levels x 8 new tokens."""
    return [f"model.path={model_dir}", "model.freeze_backbone=false", f"run_dir={run_dir}",
            "reward.engine.precision=fp32", "reward.train.max_steps=4", "reward.train.global_batch_size=8",
            "reward.train.micro_batch_size=2", "reward.train.save_every=0",
            f"reward.data.train=[{{format: helpsteer2, path: {HS2_SAMPLE}}}]",
            f"label.input=[{{format: oasst, path: {OASST}, max_rows: 200}}]", "label.engine.precision=fp32",
            "sft.engine.precision=fp32", "sft.max_length=2048", "sft.pack_length=null", "sft.train.max_steps=3",
            "sft.train.global_batch_size=8", "sft.model.lora.save_merged=false",
            "label.attributes=null",  # the tiny RM knows only HelpSteer2: let it write complexity too
            "evaluate.attributes=[verbosity,complexity]", "evaluate.n_prompts=2", "evaluate.levels=[0,4]",
            "evaluate.generation.max_new_tokens=8", *extra]


def plan_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """The plan printed first: '  <stage> <action> <reason>' -> {stage: (action, reason)}."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^  (reward|label|sft|evaluate|steerlm2|ppo)\s+(skip|run|resume|record)\s+(.*)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def compose_pipeline(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="pipeline", overrides=list(overrides))


# ===== planning without running ==================================================================
def test_stage_names_are_checked_and_run_in_pipeline_order():
    assert pipeline.selected_stages(["sft", "label"]) == ["label", "sft"]
    with pytest.raises(ConfigError, match="unknown stage 'sftt'.*reward, label, sft, evaluate, steerlm2, ppo"):
        pipeline.selected_stages(["reward", "sftt"])
    with pytest.raises(ConfigError, match="at most once"):
        pipeline.selected_stages(["sft", "sft"])
    with pytest.raises(ConfigError, match="at least one"):
        pipeline.selected_stages([])


def test_config_fingerprint_ignores_how_keys_and_names_what_changed():
    a = {"optim": {"lr": 1e-3}, "resume": "auto", "train": {"save_every": 5, "max_steps": 20}, "logging": {"x": 1}}
    b = {"optim": {"lr": 1e-4}, "resume": "never", "train": {"save_every": 1, "max_steps": 20}, "logging": {"x": 2}}
    fa, fb = pipeline.fingerprint_config(a), pipeline.fingerprint_config(b)
    assert set(fa) == {"optim.lr", "train.max_steps"}
    assert pipeline.describe_change(fa, fb) == "optim.lr: 0.001 -> 0.0001"
    assert pipeline.config_sha256(fa) != pipeline.config_sha256(fb)
    c = dict(a, resume="never", train={"save_every": 99, "max_steps": 20})
    assert pipeline.config_sha256(pipeline.fingerprint_config(c)) == pipeline.config_sha256(fa)


def test_overrides_reach_the_nested_stage_configs(tmp_path):
    cfg = compose_pipeline(f"run_dir={tmp_path}", "sft.optim.lr=1e-5", "model=tiny_llama")
    configs = pipeline.stage_configs(cfg)
    assert configs["sft"]["optim"]["lr"] == 1e-5
    assert configs["reward"]["model"]["path"] == configs["sft"]["model"]["path"] == cfg.model.path
    assert configs["label"]["rm"] == f"{tmp_path}/reward/model"
    assert configs["sft"]["data"]["train"][0]["path"] == f"{tmp_path}/label/labeled.jsonl"
    assert configs["evaluate"]["model"]["path"] == f"{tmp_path}/sft/model"
    assert "hydra" not in configs["reward"]


def test_missing_upstream_output_is_a_clear_error(tmp_path):
    cfg = compose_pipeline(f"run_dir={tmp_path}", "stages=[sft,evaluate]")
    with pytest.raises(ConfigError) as e:
        pipeline.plan(cfg)
    msg = str(e.value)
    assert f"{tmp_path}/label/labeled.jsonl" in msg and "stage 'label'" in msg and "stages=[label,sft,evaluate]" in msg


def test_cli_errors_exit_2_with_one_line(tmp_path):
    proc = run_recipe("pipeline", f"run_dir={tmp_path}", "stages=[reward,sftt]", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "steerlm: error: unknown stage 'sftt' in stages; choose from reward, label, sft, evaluate, steerlm2, ppo"]
    proc = run_recipe("pipeline", f"run_dir={tmp_path}", "stages=[label]", check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("steerlm: error: stage 'label' needs") and "the output of stage 'reward'" in line
    assert not (tmp_path / "label").exists()  # nothing ran, nothing half-written


# ===== real runs on the tiny model ===============================================================
def test_pipeline_runs_skips_and_reruns_what_changed(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "p"
    base = tiny_overrides(tiny_model_dir, run_dir)
    first = run_recipe("pipeline", *base)
    assert {s: a for s, (a, _) in plan_lines(first.stdout).items()} == dict.fromkeys(DEFAULT, "run")
    for stage in DEFAULT:
        record = json.loads((run_dir / stage / pipeline.RECORD).read_text())
        assert record["status"] == "complete" and record["outputs"], stage
    report = (run_dir / "report.md").read_text()
    for section in ("Stage 1: attribute reward model", "Stage 2: labels", "Stage 3: attribute-conditioned SFT",
                    "Steerability", "Example generations", "label_distribution.png", "sft_loss.png",
                    "evaluate/steerability.png", "| verbosity |", "MSE"):
        assert section in report, section
    assert "not complete" not in report and "no summary" not in report
    assert (run_dir / "report.html").read_text().count("data:image/png;base64,") == 3
    rm_weights = run_dir / "reward" / "model" / "model.safetensors"
    mtime = rm_weights.stat().st_mtime_ns

    # same command: nothing runs; a key that cannot change outputs does not count as a change
    again = run_recipe("pipeline", *base, "sft.train.log_every=2", "reward.resume=never")
    plan = plan_lines(again.stdout)
    assert {s: a for s, (a, _) in plan.items()} == dict.fromkeys(DEFAULT, "skip"), again.stdout
    assert rm_weights.stat().st_mtime_ns == mtime

    # a changed SFT setting re-runs sft and what reads it, and says why; the old sft dir is kept aside
    changed = run_recipe("pipeline", *base, "sft.optim.lr=3e-3")
    plan = plan_lines(changed.stdout)
    assert plan["reward"][0] == plan["label"][0] == "skip"
    assert plan["sft"] == ("run", "config changed: optim.lr: 0.001 -> 0.003")
    assert plan["evaluate"] == ("run", "upstream sft runs in this invocation")
    assert (run_dir / ".previous" / "sft" / "model").is_dir()
    assert json.loads((run_dir / "sft" / pipeline.RECORD).read_text())["config"]["optim.lr"] == 0.003
    assert rm_weights.stat().st_mtime_ns == mtime

    # an output edited behind the pipeline's back fails its checksum: that stage and everything downstream re-run
    with open(run_dir / "label" / "labeled.jsonl", "a") as fh:
        fh.write("\n")
    tampered = run_recipe("pipeline", *base, "sft.optim.lr=3e-3")
    plan = plan_lines(tampered.stdout)
    assert plan["reward"][0] == "skip"
    assert plan["label"] == ("run", "outputs changed since it completed: labeled.jsonl checksum differs")
    assert plan["sft"][0] == plan["evaluate"][0] == "run"

    # stages=[...] runs a subset against the outputs already there
    subset = run_recipe("pipeline", *base, "sft.optim.lr=3e-3", "stages=[evaluate]", "evaluate.n_prompts=1")
    assert plan_lines(subset.stdout) == {"evaluate": ("run", "config changed: n_prompts: 2 -> 1")}


def test_kill_9_during_sft_then_rerun_resumes_sft(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "p"
    overrides = tiny_overrides(tiny_model_dir, run_dir, "sft.train.max_steps=8", "sft.train.save_every=2",
                               "sft.train.global_batch_size=4")
    kill_9_after_checkpoint("pipeline", overrides, run_dir / "sft", step=2)
    assert json.loads((run_dir / "sft" / pipeline.RECORD).read_text())["status"] == "running"
    assert not (run_dir / "evaluate").exists()

    rerun = run_recipe("pipeline", *overrides)
    plan = plan_lines(rerun.stdout)
    assert plan["reward"][0] == plan["label"][0] == "skip"
    assert plan["sft"] == ("resume", "cut off earlier, same config and inputs")
    assert plan["evaluate"][0] == "run"
    assert re.search(r"resumed from \S+step_0000000[2-8] at step [2-8]", rerun.stdout)
    record = json.loads((run_dir / "sft" / pipeline.RECORD).read_text())
    assert record["status"] == "complete" and record["resumed"] is True
    assert json.loads((run_dir / "sft" / "summary.json").read_text())["steps"] == 8
    report = (run_dir / "report.md").read_text()
    assert "not complete" not in report and "(resumed)" in report


def test_pipeline_under_torchrun_two_ranks(tiny_model_dir, tmp_path):
    """One process group for all stages: reward/label/sft run on both ranks, evaluate and the report on rank 0."""
    run_dir = tmp_path / "p"
    proc = run_recipe("pipeline", *tiny_overrides(tiny_model_dir, run_dir), torchrun=2)
    assert proc.stdout.count("report: ") == 1
    for stage in ("reward", "label", "sft"):
        assert json.loads((run_dir / stage / "summary.json").read_text())["world_size"] == 2, stage
    assert json.loads((run_dir / "evaluate" / pipeline.RECORD).read_text())["status"] == "complete"
    again = run_recipe("pipeline", *tiny_overrides(tiny_model_dir, run_dir), torchrun=2)
    assert {a for a, _ in plan_lines(again.stdout).values()} == {"skip"}


def test_optional_steerlm2_and_ppo_stages_run_after_evaluate_and_report(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "p"
    steer = ["steerlm2.n_prompts=3", "steerlm2.n_samples=2", "steerlm2.generation.max_new_tokens=6",
             "steerlm2.engine.precision=fp32", "steerlm2.train.groups_per_step=2",
             "ppo.steps=2", "ppo.rollout_batch=4", "ppo.mini_batch=2", "ppo.n_prompts=4", "ppo.n_eval_prompts=2",
             "ppo.generation.max_new_tokens=6", "ppo.engine.precision=fp32", "ppo.reward.weights=[0,0,0,0,1,0,0,0,0]"]
    base = tiny_overrides(tiny_model_dir, run_dir, *steer)
    run_recipe("pipeline", *base)  # the default stages: no steerlm2
    assert not (run_dir / "steerlm2").exists() and "SteerLM 2.0" not in (run_dir / "report.md").read_text()
    proc = run_recipe("pipeline", *base, "stages=[reward,label,sft,evaluate,steerlm2]")
    plan = plan_lines(proc.stdout)
    assert {s: a for s, (a, _) in plan.items()} == {**dict.fromkeys(DEFAULT, "skip"), "steerlm2": "run"}
    summary = json.loads((run_dir / "steerlm2" / "summary.json").read_text())
    before = json.loads((run_dir / "evaluate" / "steerability.json").read_text())["attributes"]
    assert set(summary["steerability"]) == {"verbosity", "complexity"}
    assert summary["steerability"]["verbosity"]["before"] == before["verbosity"]["spearman"]  # read, not re-measured
    assert not (run_dir / "steerlm2" / "eval_before").exists() and (run_dir / "steerlm2" / "eval_after").is_dir()
    report = (run_dir / "report.md").read_text()
    assert "## SteerLM 2.0" in report and "steerlm2_distance.png" in report and "Spearman(requested, RM) before" in report
    assert "PPO" not in report

    # ppo: reads sft, reward and label (its μ, σ); the rest is up to date
    proc = run_recipe("pipeline", *base, "stages=[reward,label,sft,evaluate,steerlm2,ppo]")
    plan = plan_lines(proc.stdout)
    assert {s: a for s, (a, _) in plan.items()} == {**dict.fromkeys(DEFAULT + ("steerlm2",), "skip"), "ppo": "run"}
    ppo = json.loads((run_dir / "ppo" / "summary.json").read_text())
    assert len(ppo["reward_curve"]) == 2 and ppo["standardisation"]["from"].startswith(str(run_dir / "label"))
    record = json.loads((run_dir / "ppo" / pipeline.RECORD).read_text())
    assert str(run_dir / "label" / "labeled.jsonl") in record["inputs"] and record["status"] == "complete"
    report = (run_dir / "report.md").read_text()
    assert "## PPO from the attribute reward model" in report and "ppo_curves.png" in report
    assert "reward before (greedy)" in report and (run_dir / "ppo_curves.png").stat().st_size > 1000
