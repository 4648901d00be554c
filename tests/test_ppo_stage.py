"""The PPO stage through its CLI on the tiny SFT model and a tiny RM (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import HS2_SAMPLE as HS2, run_recipe, tiny_reward_overrides
from test_generate import train_tiny_sft


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("ppo")
    sft = train_tiny_sft(tiny_model_dir, tmp_path_factory)
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, base / "rm", f"data.train=[{{format: helpsteer2, path: {HS2}}}]"))
    return {"sft": sft, "rm": base / "rm" / "model", "base": base}


def common(models, run_dir) -> list[str]:
    return [f"policy={models['sft']}", f"rm={models['rm']}", f"run_dir={run_dir}", "steps=3", "rollout_batch=4",
            "mini_batch=2", "n_prompts=4", "n_eval_prompts=2", "generation.max_new_tokens=8",
            "engine.precision=fp32", "optim.actor_lr=1e-3", "critic_warmup_steps=1"]


def test_ppo_cli_trains_logs_and_exports(models):
    out = models["base"] / "run"
    run_recipe("train_ppo", *common(models, out), "reward.weights=[0,0,0,0,1.0,0.5,0,0,0]")
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["reward_curve"]) == 3 and len(summary["kl_curve"]) == 3
    assert summary["kl_curve"][0] == pytest.approx(0.0, abs=1e-5)  # step 1: a fresh adapter, π = π_ref exactly
    assert summary["kl_curve"][1] == pytest.approx(0.0, abs=1e-5)  # step 1 was critic warm-up: π unchanged
    assert summary["kl_curve"][-1] != 0.0 and summary["entropy_curve"][0] is None and summary["entropy_curve"][1] > 0
    assert summary["held_out_reward"]["prompts"] == 2 and summary["held_out_reward"]["after"] is not None
    assert summary["reward_weights"][4:6] == [1.0, 0.5] and sum(summary["reward_weights"]) == 1.5
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("ppo/reward_mean", "ppo/reward_std", "ppo/kl", "ppo/entropy", "ppo/clip_fraction", "ppo/value_loss",
                "ppo/generated_tokens_per_s"):
        assert all(key in m for m in metrics if m.get("step", 0) > 1), key  # step 1: critic warm-up, no policy metrics
    card = json.loads((out / "model" / "steerlm_sft.json").read_text())
    assert card["ppo"]["steps"] == 3 and card["lora"] is False and (out / "model" / "model.safetensors").exists()
    from transformers import AutoModelForSequenceClassification

    from steerlm.steerable import SteerableModel

    assert SteerableModel.load(str(out / "model")).generate(["hi"], max_new_tokens=3)[0]["tokens"] <= 3
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert critic.config.num_labels == 9


def test_ppo_reward_config_errors_are_one_line(models):
    proc = run_recipe("train_ppo", *common(models, models["base"] / "bad1"), "reward.weights=[1.0,0,0,0,0,0,0,0,0]",
                      check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "reward.weights puts weight on ['quality']" in line and "was not trained on" in line
    proc = run_recipe("train_ppo", *common(models, models["base"] / "bad2"), "reward.weights=[1.0, 0.5]", check=False)
    assert proc.returncode == 2 and "reward.weights" in proc.stderr and "2 entries" in proc.stderr


def test_kill_9_then_resume_gives_the_uninterrupted_run(models):
    """Adapter, critic, both optimizers, history and the per-step sampling seed come back: a bit-identical end."""
    from safetensors.torch import load_file

    from conftest import kill_9_after_checkpoint

    steps = ["steps=4", "save_every=1", "reward.weights=[0,0,0,0,1.0,0.5,0,0,0]"]
    full, killed = models["base"] / "full", models["base"] / "killed"
    run_recipe("train_ppo", *common(models, full), *steps)
    kill_9_after_checkpoint("train_ppo", common(models, killed) + steps, killed, 1)
    assert not (killed / "summary.json").exists()
    run_recipe("train_ppo", *common(models, killed), *steps)
    for part in ("model", "critic"):
        a, b = load_file(full / part / "model.safetensors"), load_file(killed / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    s_full, s_killed = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    for key in ("reward_curve", "kl_curve", "held_out_reward"):
        assert s_full[key] == s_killed[key], key
    # a checkpoint from another LoRA shape is refused, not half-loaded
    proc = run_recipe("train_ppo", *common(models, killed), *steps, "steps=5", "lora.r=4", check=False)
    assert proc.returncode == 2 and "does not match this config's LoRA" in proc.stderr


def test_critic_none_trains_without_a_value_model(models):
    out = models["base"] / "nocritic"
    run_recipe("train_ppo", *common(models, out), "critic=none", "reward.weights=[0,0,0,0,1.0,0,0,0,0]")
    summary = json.loads((out / "summary.json").read_text())
    assert not (out / "critic").exists() and (out / "model" / "model.safetensors").exists()
    assert summary["kl_curve"][1] != 0.0 and summary["entropy_curve"][0] is not None  # no warm-up without a critic
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("ppo/value_loss" not in m and "ppo/clip_fraction" in m for m in metrics if m.get("step"))
    # its checkpoint has no critic: resuming it with a critic is refused
    proc = run_recipe("train_ppo", *common(models, out), "critic=rm", "steps=4", "reward.weights=[0,0,0,0,1.0,0,0,0,0]",
                      check=False)
    assert proc.returncode == 2 and "saved without a critic" in proc.stderr



def letter_fraction_reward(scorer, prompts, texts, schema, weights, mean, std, stats=None):
    """A known reward in place of the RM: the fraction of a response's characters that are ASCII letters or
    spaces (the optimum, 1.0, is reachable: avoid the byte tokens that decode to '�' and punctuation)."""
    frac = [sum(c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ " for c in t) / max(len(t), 1) for t in texts]
    return list(range(len(texts))), torch.tensor(frac)


def run_known_reward_ppo(models, run_dir, kl_coef: float, monkeypatch) -> dict:
    """The whole stage (rollouts, RM critic, GAE, clipped updates, held-out eval) in-process with the reward swapped.

    The LoRA adapter includes lm_head: a random tiny model's logits are bounded by its lm_head scale
    (RMSNorm fixes |h|, so |logit| <= |h| |w_v| ~ 1.3), and an adapter without it cannot concentrate the policy.
    """
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from steerlm.stages import ppo

    monkeypatch.setattr(ppo, "score_responses", letter_fraction_reward)
    monkeypatch.setattr("steerlm.stages.ppo_setup.score_responses", letter_fraction_reward)  # held-out reward
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="ppo", overrides=[
            f"policy={models['sft']}", f"rm={models['rm']}", f"run_dir={run_dir}", "steps=24", "rollout_batch=32",
            "mini_batch=16", "n_prompts=16", "n_eval_prompts=4", "generation.max_new_tokens=8", "engine.precision=fp32",
            "optim.actor_lr=1e-2", "critic=none", "save_every=0", f"kl_coef={kl_coef}",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"])
    return ppo.run(cfg)


def test_ppo_stage_raises_a_known_reward_and_the_kl_penalty_bounds_the_drift(models, monkeypatch):
    mean = lambda xs: sum(xs) / len(xs)
    weak = run_known_reward_ppo(models, models["base"] / "known_beta0.01", 0.01, monkeypatch)
    print("known-reward PPO, β 0.01:", [round(r, 3) for r in weak["reward_curve"]], [round(k, 2) for k in weak["kl_curve"]])
    start, end = mean(weak["reward_curve"][:4]), mean(weak["reward_curve"][-4:])
    assert start < 0.8 and end > 0.88 and end > start + 0.12, weak["reward_curve"]
    held = weak["held_out_reward"]
    assert held["after"] > held["before"], held  # greedy responses to prompts it never trained on
    # β 10x larger: the policy stays near π_ref and earns less (the regularised optimum moves toward π_ref)
    strong = run_known_reward_ppo(models, models["base"] / "known_beta0.1", 0.1, monkeypatch)
    print("β 0.1:", [round(r, 3) for r in strong["reward_curve"]], [round(k, 2) for k in strong["kl_curve"]])
    kl_weak, kl_strong = mean(weak["kl_curve"][-6:]), mean(strong["kl_curve"][-6:])
    assert kl_strong < 3.0 and kl_strong < 0.4 * kl_weak, (weak["kl_curve"], strong["kl_curve"])
    assert mean(strong["reward_curve"][-6:]) < mean(weak["reward_curve"][-6:])
