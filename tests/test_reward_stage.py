"""Stage 1 end to end through the real CLI on a tiny model: export, HF reload, resume, distributed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_9_after_checkpoint, run_recipe, tiny_reward_overrides
from steerlm.logging import read_metrics


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_hf_automodel_reproduces_steerlm_predictions(tiny_model_dir, tmp_path):
    """The exported RM loads in plain transformers and predicts what steerlm predicts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from steerlm.attributes import AttributeSchema
    from steerlm.data.batching import pad_token_batch
    from steerlm.models.reward_model import load_reward_model
    from steerlm.templates import tokenize_rm_input

    run_dir = tmp_path / "rm"
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, run_dir))
    model_dir = run_dir / "model"
    schema = AttributeSchema.load(model_dir)
    card = json.loads((model_dir / "steerlm_reward.json").read_text())
    assert schema.name == "steerlm9" and card["template"] == "nemo"

    tok = AutoTokenizer.from_pretrained(model_dir)
    convs = [[{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Rayleigh scattering."}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help you today, friend?"}]]
    seqs = [tokenize_rm_input("nemo", tok, None, c) for c in convs]
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert hf.config.num_labels == 9 and hf.config.problem_type == "regression"
    assert [hf.config.id2label[i] for i in range(9)] == list(schema.attributes)
    ours = load_reward_model(str(model_dir), schema, pad_token_id=tok.pad_token_id, require_rm=True).eval()
    for side in ("right", "left"):
        ids, mask = pad_token_batch(seqs, tok.pad_token_id, padding_side=side)
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask).logits
            got = ours(ids, mask)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the head actually moved away from its init: predictions differ between the two inputs
    assert not torch.allclose(got[0], got[1])


def test_ddp_and_fsdp2_match_single_process(tiny_model_dir, tmp_path):
    """Same global batch, fp32: the loss curve under torchrun x2 equals the single-process one."""
    base = tiny_reward_overrides(tiny_model_dir, tmp_path / "single", "train.max_steps=5")
    run_recipe("train_reward", *base)
    ref = losses(tmp_path / "single")
    assert len(ref) == 5
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, out, "train.max_steps=5",
                                                          f"engine.strategy={strategy}"), torchrun=2)
        torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(ref), rtol=1e-5, atol=1e-6)
        a = load_file(str(out / "model" / "model.safetensors"))
        b = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_micro_batch_split_and_gradient_checkpointing_do_not_change_the_step(tiny_model_dir, tmp_path):
    """micro 1 x accumulation 8 == micro 8 x accumulation 1 (loss reduced by the global batch); recomputing the
    activations in backward changes memory, not the step."""
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "a", "train.micro_batch_size=1"))
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "b", "train.micro_batch_size=8"))
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "c", "train.micro_batch_size=8",
                                                      "model.gradient_checkpointing=true"))
    for other in ("b", "c"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "a")), torch.tensor(losses(tmp_path / other)),
                                   rtol=1e-5, atol=1e-6)


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    steps = ["train.max_steps=40", "train.save_every=2", "train.global_batch_size=4"]
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "full", *steps))

    killed = tmp_path / "killed"
    kill_9_after_checkpoint("train_reward", tiny_reward_overrides(tiny_model_dir, killed, *steps), killed, 6)

    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, killed, *steps, "resume=auto"))
    a = load_file(str(killed / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the metrics log holds every step once from the uninterrupted part and the resumed part
    steps_logged = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "train/loss" in r]
    assert steps_logged[-1] == 40 and set(range(1, 41)) <= set(steps_logged)


def test_frozen_backbone_trains_only_the_head_and_reuses_its_feature_cache(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "frozen"
    over = [f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "engine.precision=fp32", "model.freeze_backbone=true",
            "train.epochs=3", "train.global_batch_size=32", "optim.lr=1e-2", "eval.val_fraction=0.2",
            "max_length=256"]
    run_recipe("train_reward", *over)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    got = load_file(str(run_dir / "model" / "model.safetensors"))
    for k, v in got.items():
        if k == "score.weight":
            assert v.abs().sum() > 0
        else:
            torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    assert (run_dir / "cache" / "features.safetensors").exists()
    again = run_recipe("train_reward", *over, f"run_dir={run_dir}", "resume=never")
    assert "feature cache: reusing" in again.stdout


def test_schema_mismatch_between_checkpoint_and_run_is_an_error(tiny_model_dir, tmp_path):
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "rm"))
    proc = run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "again"),
                      f"model.path={tmp_path / 'rm' / 'model'}", "schema=helpsteer2", check=False)
    assert proc.returncode != 0
    assert "attribute schema mismatch" in proc.stderr and "steerlm9" in proc.stderr


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_over_length_policy(tiny_model_dir, tmp_path, policy):
    proc = run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / policy),
                      "max_length=300", f"over_length={policy}", check=False)
    if policy == "error":
        assert proc.returncode != 0
        assert "> max_length 300" in proc.stderr and "sample" in proc.stderr
        assert not (tmp_path / policy / "model").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        summary = json.loads((tmp_path / policy / "summary.json").read_text())
        assert summary["data"]["train"]["skipped"]["over_length"] > 0


def test_scaled_bt_from_a_stage1_rm_on_preference_pairs(tiny_model_dir, tmp_path):
    """HelpSteer2-Preference chain: regression RM -> scaled BT on pairs; pairs stay intact, loss goes down."""
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "rm"))
    pairs = "data.pairs=[{format: oasst, path: data/oasst1/oasst1_validation_en.messages.jsonl.gz}]"
    out = tmp_path / "bt"
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, out), f"model.path={tmp_path / 'rm' / 'model'}",
               "loss.type=scaled_bt", pairs, "loss.pair_weights={quality: 1.0}", "train.max_steps=12",
               "optim.lr=1e-3", "optim.warmup_steps=0", "max_length=512")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train_pairs"]["kept"] > 150
    curve = losses(out)
    assert len(curve) == 12 and sum(curve[-4:]) < sum(curve[:4])
    card = json.loads((out / "model" / "steerlm_reward.json").read_text())
    assert card["loss"] == "scaled_bt" and card["trained_attributes"] == ["quality"]
    assert card["eval"]["pairwise_accuracy"]["preference_pairs"]["pairs"] > 10


def test_wandb_offline_logging(tiny_model_dir, tmp_path):
    out = tmp_path / "wb"
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, out, "train.max_steps=2"),
               "logging.wandb.enabled=true", "logging.wandb.mode=offline", env={"WANDB_SILENT": "true"})
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_embedded_default_model_trains_a_frozen_head(tmp_path):
    """The default config end to end on the real SmolLM2-135M (few rows to stay fast)."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "default"
    run_recipe("train_reward", f"run_dir={out}", "max_length=512", "train.epochs=2",
               "data.train=[{format: helpsteer2, path: data/helpsteer2/helpsteer2_train_first100.jsonl, max_rows: 12}]")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frozen_backbone"] and summary["feature_tokens_per_s"] > 0
    hf = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert hf.config.num_labels == 9 and hf.config.model_type == "llama" and hf.config.num_hidden_layers == 30


def test_frozen_backbone_resume_from_a_head_only_checkpoint(tiny_model_dir, tmp_path):
    """Frozen runs checkpoint only the head; resuming from step 8 of 12 ends on the same weights."""
    over = lambda d: [f"model.path={tiny_model_dir}", f"run_dir={d}", "engine.precision=fp32",
                      "model.freeze_backbone=true", "train.max_steps=12", "train.save_every=4",
                      "train.keep_checkpoints=3", "train.global_batch_size=16", "max_length=256"]
    run_recipe("train_reward", *over(tmp_path / "a"))
    ckpt_dir = tmp_path / "a" / "checkpoints" / "step_00000008"
    assert set(load_file(str(ckpt_dir / "model.safetensors"))) == {"hf_model.score.weight"}
    ref = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))["score.weight"]
    # simulate a crash right after the step-8 checkpoint: no final model, latest -> step 8
    import shutil
    shutil.rmtree(tmp_path / "a" / "model")
    (tmp_path / "a" / "checkpoints" / "latest").write_text("step_00000008")
    proc = run_recipe("train_reward", *over(tmp_path / "a"))
    assert "resumed from" in proc.stdout and "step 8" in proc.stdout
    got = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))["score.weight"]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
