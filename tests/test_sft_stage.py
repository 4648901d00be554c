"""Stage 3 end to end through the real CLI on a tiny model: distributed equality, packing, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_9_after_checkpoint, run_recipe, tiny_sft_overrides
from steerlm.attributes import get_schema
from steerlm.logging import read_metrics
from steerlm.stages.sft_data import dropout_labels


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def weights(run_dir: Path) -> dict:
    d = run_dir / "model"
    return load_file(str(d / ("adapter_model.safetensors" if (d / "adapter_config.json").exists() else "model.safetensors")))


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], **tol)


@pytest.mark.parametrize("lora", [False, True])
def test_ddp_and_fsdp2_match_single_process(tiny_model_dir, tmp_path, lora):
    """Same global batch, fp32: losses and final weights under torchrun x2 equal the single-process run."""
    extra = [f"model.lora.enabled={lora}", "optim.lr=1e-3", "train.eval_every=1"]
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "single", *extra))
    ref = losses(tmp_path / "single")
    assert len(ref) == 3
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, out, *extra, f"engine.strategy={strategy}"),
                   torchrun=2)
        torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(ref), rtol=1e-5, atol=1e-6)
        assert_same_weights(weights(out), weights(tmp_path / "single"), rtol=1e-4, atol=1e-6)


def test_packed_and_unpacked_training_take_the_same_steps(tiny_model_dir, tmp_path):
    """The loss is reduced by the global batch's trained tokens, so packing changes speed, not the step."""
    common = ["model.lora.enabled=false", "optim.lr=1e-3", "train.group_by_length=false"]
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "packed", *common, "packing=true"))
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "padded", *common, "packing=false",
                                                "train.micro_batch_size=3"))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "packed")), torch.tensor(losses(tmp_path / "padded")),
                               rtol=1e-5, atol=1e-6)
    assert_same_weights(weights(tmp_path / "packed"), weights(tmp_path / "padded"), rtol=1e-4, atol=1e-6)
    packed = json.loads((tmp_path / "packed" / "summary.json").read_text())
    padded = json.loads((tmp_path / "padded" / "summary.json").read_text())
    assert packed["packing_efficiency"] == 1.0 > padded["packing_efficiency"]
    assert packed["tokens"] == padded["tokens"] and packed["trained_tokens"] == padded["trained_tokens"]


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    """LoRA + attribute dropout across an epoch boundary: the resumed adapter is bit-identical."""
    steps = ["train.max_steps=14", "train.save_every=2", "attribute_dropout=0.3"]
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "full", *steps))

    killed = tmp_path / "killed"
    kill_9_after_checkpoint("train_sft", tiny_sft_overrides(tiny_model_dir, killed, *steps), killed, 8)

    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, killed, *steps, "resume=auto"))
    assert_same_weights(weights(killed), weights(tmp_path / "full"), rtol=0, atol=0)
    steps_logged = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "train/loss" in r]
    assert steps_logged[-1] == 14 and set(range(1, 15)) <= set(steps_logged)


def test_exported_model_loads_with_transformers_and_keeps_its_attributes(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, out, "model.lora.save_merged=true", "optim.lr=1e-2",
                                                "default_attributes.verbosity=1"))
    card = json.loads((out / "model" / "steerlm_sft.json").read_text())
    assert card["steerable_attributes"] == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    assert card["default_attributes"] == {"helpfulness": 4.0, "correctness": 4.0, "coherence": 4.0,
                                          "complexity": 2.0, "verbosity": 1.0}
    assert card["format"]["template"] == "hf" and card["lora"] is True
    assert get_schema(str(out / "model")).name == "steerlm9" and (out / "merged" / "attribute_schema.json").exists()

    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # plain transformers, no steerlm code
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, out / "model")
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
        c = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapter changed the model


def test_attribute_dropout_is_deterministic_and_draws_subsets():
    turns = [{"role": "user", "content": "q", "labels": None},
             {"role": "assistant", "content": "a", "labels": {f"a{i}": 1.0 for i in range(20)}}]
    a = dropout_labels(turns, 0.5, seed=1, epoch=0, conv_key="c1")
    assert a == dropout_labels(turns, 0.5, seed=1, epoch=0, conv_key="c1")
    assert a != dropout_labels(turns, 0.5, seed=1, epoch=1, conv_key="c1")
    assert a[0] is None and 3 <= len(a[1]) <= 17
    assert dropout_labels(turns, 0.0, seed=1, epoch=0, conv_key="c1")[1] == turns[1]["labels"]


def test_schema_mismatch_with_labeled_data_is_an_error(tiny_model_dir, tmp_path):
    data = tmp_path / "labels"
    data.mkdir()
    (data / "labeled.jsonl").write_text(json.dumps({"id": "x", "group": "x", "system": None, "source": "t", "turns": [
        {"role": "user", "content": "hi", "labels": None},
        {"role": "assistant", "content": "hello", "labels": {"quality": 3}}]}) + "\n")
    get_schema("oasst").save(data)
    proc = run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "run"),
                      f"data.train=[{{format: canonical, path: {data / 'labeled.jsonl'}}}]", check=False)
    assert proc.returncode == 2
    assert "steerlm: error: attribute schema mismatch" in proc.stderr and "labeled.jsonl" in proc.stderr


def test_over_length_error_names_the_conversation(tiny_model_dir, tmp_path):
    proc = run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "run", "max_length=64",
                                                       "over_length=error"), check=False)
    assert proc.returncode == 2
    line = [l for l in proc.stderr.splitlines() if l.startswith("steerlm: error:")]
    assert len(line) == 1 and "max_length 64" in line[0] and "helpsteer2" in line[0]
