"""Conditioning strength (steerlm.conditioning) on known answers.

A tiny random Llama is fine-tuned by the real SFT stage on synthetic conversations whose response is decided
by the humor label (level k -> the word WORDS[k], repeated). Trained on the true labels it must follow the
attribute (strength near 1, interval above 0); trained on the same responses, each one with every label, it
has nothing to learn from the attribute (interval containing 0); and a model whose logits do not
depend on the context at all has strength exactly 0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_recipe
from steerlm.attributes import get_schema
from steerlm.conditioning import decoded_levels, labeled_responses, measure, preference_slopes
from steerlm.models.policy import load_for_generation, read_card
from steerlm.models.reward_model import load_tokenizer
from steerlm.sft_template import SFTFormat

WORDS = ["apple", "river", "stone", "cloud", "flame"]
PROMPTS = ["Say something.", "Tell me a thing.", "Write one line.", "Go on.", "Speak."]


def synthetic(n: int, seed: int, uninformative: bool = False) -> list[dict]:
    """n conversations; response level k -> WORDS[k] x 3, labeled k. uninformative: every response appears once
    with each label 0..4 (5n rows), so in the data the label says nothing about the response."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        prompt, level = rng.choice(PROMPTS), k % 5
        for label in (range(5) if uninformative else [level]):
            rows.append({"id": f"c{seed}-{k}-{label}", "group": f"g{seed}-{k}", "system": None, "source": "synthetic",
                         "turns": [{"role": "user", "content": prompt, "labels": None},
                                   {"role": "assistant", "content": " ".join([WORDS[level]] * 3),
                                    "labels": {"humor": float(label), "quality": 2.0}}]})
    return rows


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """{true: trained on true labels, uninformative: on labels that say nothing}, both by the real SFT stage."""
    base = tmp_path_factory.mktemp("cond")
    out = {}
    for name, n, uninformative in (("true", 200, False), ("uninformative", 40, True)):
        data = write(synthetic(n, seed=1, uninformative=uninformative), base / f"{name}.jsonl")
        run_dir = base / name
        run_recipe("train_sft", f"model.path={tiny_model_dir}", f"run_dir={run_dir}",
                   f"data.train=[{{format: canonical, path: {data}}}]", "engine.precision=fp32",
                   "model.lora.enabled=false", "optim.lr=3e-3", "optim.warmup_steps=2", "train.max_steps=150",
                   "train.global_batch_size=16", "train.save_every=0", "eval.val_fraction=0.0", "eval.conditioning.n=0")
        out[name] = run_dir / "model"
    return out


def strength(model_dir: Path, n: int = 60, steering_of=None):
    card = read_card(str(model_dir))
    tok = load_tokenizer(str(model_dir))
    model = load_for_generation(str(model_dir))
    held_out = synthetic(n, seed=7)  # true labels: the known answer
    return measure(model, tok, SFTFormat.from_dict(card["format"]), get_schema("steerlm9"), held_out, ["humor"],
                   device=torch.device("cpu"), n_boot=500, steering_of=steering_of)["attributes"]["humor"]


def test_a_model_trained_on_true_labels_follows_the_attribute(trained):
    r = strength(trained["true"])
    assert r["n"] == 60 and r["verdict"] == "follows"
    assert r["strength"]["value"] > 0.8 and r["strength"]["lo"] > 0.5
    assert r["gain"]["value"] > 0.5  # decoded level per label level (1: exact)


def test_a_model_trained_on_uninformative_labels_does_not(trained):
    r = strength(trained["uninformative"])
    s = r["strength"]
    assert s["lo"] <= 0 <= s["hi"] and abs(s["value"]) < 0.35, s
    assert r["verdict"] == "noise"


def test_a_model_blind_to_its_context_has_strength_exactly_zero(tiny_model_dir, trained):
    class Unigram(torch.nn.Module):
        """Fixed next-token logits whatever the input: ignores the attribute string by construction."""

        def __init__(self, vocab: int):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))

        def forward(self, input_ids, logits_to_keep=None, **_):
            out = self.logits.expand(*input_ids.shape, -1)
            return type("Out", (), {"logits": out[logits_to_keep] if logits_to_keep is not None else out})

    tok = load_tokenizer(str(trained["true"]))
    card = read_card(str(trained["true"]))
    r = measure(Unigram(len(tok)), tok, SFTFormat.from_dict(card["format"]), get_schema("steerlm9"),
                synthetic(30, seed=7), ["humor"], device=torch.device("cpu"), n_boot=200)["attributes"]["humor"]
    assert r["strength"]["value"] == 0.0 and r["mean_abs_slope"] == 0.0 and r["verdict"] == "noise"


def test_slopes_decoded_levels_and_group_round_robin():
    ll = np.array([[0.0, 1.0, 2.0], [4.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    assert preference_slopes(ll, [0, 2, 4]).tolist() == pytest.approx([0.5, -1.0, 0.0])
    decoded = decoded_levels(ll, [0, 2, 4])
    assert decoded[2] == pytest.approx(2.0) and decoded[0] > 3 and decoded[1] < 0.5  # uniform -> the middle
    convs = [{"id": f"{g}{k}", "group": g, "system": None,
              "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "labels": {"humor": 1.0}}]}
             for g in "ab" for k in range(3)]
    convs.append({"id": "c0", "group": "c", "system": None,
                  "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "labels": None}]})
    picked = [c["id"] for c in labeled_responses(convs, "humor")]
    assert picked == ["a0", "b0", "a1", "b1", "a2", "b2"]  # one per group first; unlabeled turns left out


def test_the_contrast_term_teaches_the_label_faster_than_plain_sft(tiny_model_dir, tmp_path):
    """Same data, steps and seed; contrast.weight=1 adds −log σ(log π(y|own label) − log π(y|other label))."""
    data = write(synthetic(200, seed=1), tmp_path / "true.jsonl")
    results = {}
    for name, extra in (("plain", []), ("contrast", ["contrast.weight=1.0"])):
        run_dir = tmp_path / name
        run_recipe("train_sft", f"model.path={tiny_model_dir}", f"run_dir={run_dir}",
                   f"data.train=[{{format: canonical, path: {data}}}]", "engine.precision=fp32",
                   "model.lora.enabled=false", "optim.lr=3e-3", "optim.warmup_steps=2", "train.max_steps=40",
                   "train.global_batch_size=16", "train.save_every=0", "eval.val_fraction=0.0", "eval.conditioning.n=0",
                   *extra)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = (strength(run_dir / "model"), [m.get("train/contrast_margin") for m in metrics if "train/loss" in m])
    plain, (contrast, margins) = results["plain"][0], results["contrast"]
    assert all(m is None for m in results["plain"][1])  # plain SFT computes no contrast
    assert margins[-1] > margins[0] + 5  # log π(y|own) − log π(y|other), nats: learned
    # measured: plain 0.47 [0.19, 0.67], gain 0.06; contrast (other=random) 0.93 [0.85, 0.97], gain 0.75
    assert contrast["strength"]["lo"] > max(0.8, plain["strength"]["hi"])
    assert contrast["gain"]["value"] > 3 * plain["gain"]["value"]


def test_contrast_levels_random_are_balanced_and_far_is_the_far_end(tiny_model_dir):
    """other=random: never the own level, and each level is the moved-to one about as often as it is the own one
    (no 'the ends are wrong' shortcut); other=far: the far end of the scale."""
    from steerlm.stages.sft_data import contrast_epoch

    schema, tok, fmt = get_schema("steerlm9"), load_tokenizer(str(tiny_model_dir)), SFTFormat("hf")
    convs = synthetic(500, seed=3)
    moved = {}
    for other in ("random", "far"):
        enc = contrast_epoch(convs, fmt, tok, schema, attributes=["humor"], dropout=0.0, seed=0, epoch=0, other=other)
        moved[other] = []
        for c, e in zip(convs, enc):
            text = tok.decode([i for i, m in zip(e[0], e[1]) if not m])
            moved[other].append(int(text.split("humor:")[-1][0]))
    own = [c["turns"][-1]["labels"]["humor"] for c in convs]
    assert all(m != o for m, o in zip(moved["random"], own))
    counts = np.bincount(moved["random"], minlength=5)
    assert counts.min() > 0.7 * len(convs) / 5 and counts.max() < 1.3 * len(convs) / 5
    assert all(m == (4 if o < 2 else 0) or (o == 2 and m in (0, 4)) for m, o in zip(moved["far"], own))
