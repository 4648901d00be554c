"""SteerLM 2.0: the math on known values and a toy model, the NeMo dataset format, and a real tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import HS2_SAMPLE as HS2, run_recipe, tiny_reward_overrides
from steerlm.attributes import get_schema
from steerlm.data.packing import collate_padded
from steerlm.errors import ConfigError, DataError
from steerlm.losses import next_token_nll, sequence_log_probs, token_log_probs
from steerlm.steerlm2_math import (attribute_log_likelihood, baseline_weights, level_bins, level_probabilities,
                                   listwise_loss, target_weights)
from steerlm.stages import steerlm2_data as sd
from test_generate import train_tiny_sft

SCHEMA = get_schema("steerlm9")


# ===== attribute likelihood ======================================================================
@pytest.mark.parametrize("bins", ["round", "equal"])
@pytest.mark.parametrize("r", [-1.0, 0.0, 0.3, 1.7, 2.0, 3.49, 4.0, 5.5])
def test_beta_likelihood_sums_to_one_over_levels(r, bins):
    p = level_probabilities(r, SCHEMA, bins=bins)
    assert p.shape == (5,) and (p >= 0).all()
    assert p.sum() == pytest.approx(1.0, abs=1e-9)


def test_round_bins_put_the_most_mass_on_the_rounded_level():
    assert level_bins(SCHEMA, "round") == [(0.0, 0.125), (0.125, 0.375), (0.375, 0.625), (0.625, 0.875), (0.875, 1.0)]
    for r in (0.0, 1.0, 2.0, 3.0, 4.0, 1.2, 2.8):
        assert int(np.argmax(level_probabilities(r, SCHEMA))) == round(r)
    # a larger concentration is more certain about the same level
    assert level_probabilities(2.0, SCHEMA, concentration=96)[2] > level_probabilities(2.0, SCHEMA)[2]


def test_log_likelihood_is_the_sum_over_requested_attributes():
    scores = {"helpfulness": 3.2, "verbosity": 0.4, "humor": 1.0}
    target = {"helpfulness": 3, "verbosity": 0}
    expected = math.log(level_probabilities(3.2, SCHEMA)[3]) + math.log(level_probabilities(0.4, SCHEMA)[0])
    assert attribute_log_likelihood(scores, target, SCHEMA) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="no score for attribute 'quality'"):
        attribute_log_likelihood(scores, {"quality": 4}, SCHEMA)


# ===== weights and the listwise loss =============================================================
def test_weights_sum_to_one_and_the_baseline_is_uniform_at_q_prime():
    lp_a, lp_y, lq = torch.tensor([-1.0, -3.0, -0.5, -2.0]), torch.tensor([-40., -35., -52., -44.]), torch.tensor([-38., -36., -50., -47.])
    w = target_weights(lp_a, lp_y, lq)
    assert float(w.sum()) == pytest.approx(1.0)
    assert torch.allclose(w, torch.softmax(lp_a + lp_y - lq, 0))
    b = baseline_weights(lq.clone().requires_grad_(), lq)
    assert torch.allclose(b, torch.full((4,), 0.25)) and not b.requires_grad
    b2 = baseline_weights(lq + torch.tensor([1.0, 0.0, 0.0, 0.0]), lq)
    assert float(b2.sum()) == pytest.approx(1.0) and b2[0] > b2[1]


def test_loss_gradient_is_minus_sum_of_weight_differences_times_score_function():
    """On a toy policy (free logits over a 6-token vocabulary, 3-token responses): autograd of the
    implemented loss == −Σ (w' − b') ∇ log Q_θ(y_i) / L̄, with b' from the current θ."""
    torch.manual_seed(0)
    theta = torch.randn(3, 6, requires_grad=True)  # position-wise logits
    ys = torch.tensor([[0, 1, 2], [3, 3, 1], [5, 0, 4], [2, 2, 2]])

    def log_q(th):
        return torch.log_softmax(th, -1).gather(-1, ys.T).T.sum(-1)  # (4,)

    lq_prime = log_q(theta).detach() + torch.tensor([0.3, -0.2, 0.1, 0.0])  # θ has moved away from Q'
    w = target_weights(torch.tensor([-1.0, -2.0, -0.2, -3.0]), torch.tensor([-9.0, -8.0, -9.5, -7.0]), lq_prime)
    n_tokens = torch.tensor([3, 3, 3, 3])
    loss, info = listwise_loss(log_q(theta), w, lq_prime, n_tokens)
    (grad,) = torch.autograd.grad(loss, theta)

    b = torch.softmax(log_q(theta).detach() - lq_prime, 0)
    expected = torch.zeros_like(theta)
    for i in range(4):
        (g_i,) = torch.autograd.grad(log_q(theta)[i], theta)
        expected -= (w[i] - b[i]) * g_i / 3.0
    assert torch.allclose(grad, expected, atol=1e-6)
    assert info["distance"] == pytest.approx(float((w * (w.log() - b.log())).sum()), abs=1e-5)
    # the step moves Q_θ's listwise distribution toward w': KL shrinks after a small gradient step
    with torch.no_grad():
        theta2 = theta - 0.5 * grad
    b_after = torch.softmax(log_q(theta2) - lq_prime, 0)
    assert float((w * (w.log() - b_after.log())).sum()) < info["distance"]


def test_sequence_log_probs_match_the_sft_nll(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    seqs = [([5, 9, 11, 20, 7], [False, False, True, True, True]), ([3, 4, 8], [False, True, True])]
    b = collate_padded(seqs, pad_id=0)
    with torch.no_grad():
        lp = sequence_log_probs(model, b)
        for r, s in enumerate(seqs):
            one = collate_padded([s], pad_id=0)
            nll, n = next_token_nll(model, {"input_ids": one["input_ids"], "attention_mask": one["attention_mask"],
                                            "loss_mask": one["loss_mask"]})
            assert n == sum(s[1][1:]) and float(-nll) == pytest.approx(float(lp[r]), rel=1e-5)
        # per token: the full-vocabulary log-softmax at the trained positions, exactly 0 elsewhere
        per_token, logits = token_log_probs(model, b)
        full = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
        want = full[:, :-1].gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1) * b["loss_mask"][:, 1:]
        assert torch.allclose(per_token[:, 1:], want, atol=1e-5) and (per_token[:, 0] == 0).all()
        assert logits.shape == (int(b["loss_mask"][:, 1:].sum()), full.shape[-1])  # only trained positions


# ===== the dataset ===============================================================================
def group(n=3):
    return {"id": "g1", "system": "be brief", "turns": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"},
                                                        {"role": "user", "content": "explain DNS"}],
            "attributes": {"helpfulness": 4.0, "verbosity": 0.0},
            "responses": [{"text": f"answer {i}", "log_p_a": -1.0 * i, "log_p_y": -20.5 + i, "log_q_prime": -19.0,
                           "scores": {"helpfulness": 3.5}, "tokens": 4} for i in range(n)]}


def test_dataset_round_trips_through_nemo_aligner_field_names(tmp_path):
    path = tmp_path / "s.jsonl"
    sd.write_groups(path, [group()], SCHEMA)
    row = json.loads(path.read_text())
    assert row["prompt_turns"] == [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "hello"},
                                   {"from": "User", "value": "explain DNS"}]
    assert row["label"] == "helpfulness:4,verbosity:0" and row["system"] == "be brief"
    assert row["responses"][1]["from"] == "Assistant" and row["responses"][1]["value"] == "answer 1"
    assert row["responses"][1]["log(P(a|x,y))"] == -1.0 and row["responses"][1]["log(P(y|x))"] == -19.5
    assert row["responses"][1]["log(Q(y|a,x))"] == -19.0
    assert sd.read_groups(path, SCHEMA) == [group()]


def test_bad_dataset_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    row = sd.to_nemo_row(group(), SCHEMA)
    row["responses"][2]["log(P(y|x))"] = "v2"  # the NeMo doc's string placeholders
    path.write_text(json.dumps(sd.to_nemo_row(group(), SCHEMA)) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'responses\[2\].log\(P\(y\|x\)\)': must be a finite number"):
        sd.read_groups(path, SCHEMA)
    path.write_text(json.dumps({**sd.to_nemo_row(group(), SCHEMA), "label": "helpfullness:4"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'label'"):
        sd.read_groups(path, SCHEMA)
    path.write_text(json.dumps(sd.to_nemo_row(group(1), SCHEMA)) + "\n")
    with pytest.raises(DataError, match="at least 2 responses"):
        sd.read_groups(path, SCHEMA)


def test_response_mask_covers_only_the_final_response(tiny_model_dir):
    from steerlm.models.reward_model import load_tokenizer
    from steerlm.sft_template import SFTFormat

    tok = load_tokenizer(str(tiny_model_dir))
    fmt = SFTFormat("nemo")
    ids, mask = sd.encode_response(fmt, tok, SCHEMA, group(), "the final answer", conditioned=True)
    text = tok.decode([t for t, m in zip(ids, mask) if m])
    assert text == "the final answer\n<extra_id_1>"
    full = tok.decode(ids)
    assert "<extra_id_2>helpfulness:4,verbosity:0\n" in full and full.count("<extra_id_2>") == 1
    ids_u, mask_u = sd.encode_response(fmt, tok, SCHEMA, group(), "the final answer", conditioned=False)
    assert "<extra_id_2>" not in tok.decode(ids_u) and tok.decode([t for t, m in zip(ids_u, mask_u) if m]) == text


# ===== a real run ================================================================================
def test_steerlm2_cli_on_the_tiny_model(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("steerlm2")
    sft = train_tiny_sft(tiny_model_dir, tmp_path_factory)
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, base / "rm", f"data.train=[{{format: helpsteer2, path: {HS2}}}]"))
    out = base / "s2"
    overrides = [f"policy={sft}", f"rm={base / 'rm' / 'model'}", f"run_dir={out}", "n_prompts=5", "n_samples=3",
                 "generation.max_new_tokens=8", "train.groups_per_step=2", "engine.precision=fp32",
                 "eval.n_prompts=2", "eval.levels=[0,4]", "eval.generation.max_new_tokens=6", "optim.lr=1e-2"]
    proc = run_recipe("train_steerlm2", *overrides)
    rows = [json.loads(x) for x in (out / "iter_1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["responses"]) == 3 for r in rows)
    assert [r["label"].split("verbosity:")[1][0] for r in rows] == ["0", "2", "4", "0", "2"]  # targets cycle
    summary = json.loads((out / "summary.json").read_text())
    [it] = summary["iterations"]
    assert it["steps"] == 3 and len(it["distance"]) == 3 and all(d >= 0 for d in it["distance"])
    assert set(summary["steerability"]) == {"verbosity"} and "before" in summary["steerability"]["verbosity"]
    for d in ("model", "merged", "eval_before", "eval_after"):
        assert (out / d).is_dir(), d
    card = json.loads((out / "model" / "steerlm_sft.json").read_text())
    assert card["steerlm2"]["iteration"] == 1
    merged_card = json.loads((out / "merged" / "steerlm_sft.json").read_text())
    assert merged_card["lora"] is False and merged_card["steerlm2"]["iteration"] == 1
    assert "steerlm2/distance" in (out / "metrics.jsonl").read_text()
    # the adapter moved away from the SFT adapter
    from safetensors.torch import load_file
    a, b = load_file(sft / "adapter_model.safetensors"), load_file(out / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # a rerun finds the iteration done; a bring-your-own NeMo file trains without sampling
    again = run_recipe("train_steerlm2", *overrides, "eval.enabled=false")
    assert "iteration 1 already done" in again.stdout
    byo = run_recipe("train_steerlm2", *overrides, f"run_dir={base / 'byo'}", f"data_file={out / 'iter_1' / 'samples.jsonl'}",
                     "eval.enabled=false")
    assert "groups': 5" in byo.stdout and not (base / "byo" / "iter_1" / "samples.jsonl").read_text() == ""
    assert proc.returncode == 0
