"""Level steering (`steerlm.steering.levels`): a checkpoint's own attribute vectors applied in proportion to each
request's explicit level. The spec math, save/load, merging with a request's own steering, and one real SFT run
on the tiny model whose checkpoint then steers generate and the conditioning measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HS2_SAMPLE as HS2, assert_one_error, run_recipe, tiny_sft_overrides
from steerlm.attributes import BUILTIN_SCHEMAS
from steerlm.data.sources import load_mixture
from steerlm.errors import ConfigError
from steerlm.steering.levels import LEVEL_DIR, LevelSteering, check_for_run, copy_level_steering, merge
from steerlm.steering.ops import SteeringSpec
from steerlm.steering.vectors import AttributeVectors

H = 8


def level_steering(gain=2.0, layer=1) -> LevelSteering:
    g = torch.Generator().manual_seed(0)
    vecs = {a: {layer: torch.randn(H, generator=g)} for a in ("verbosity", "humor")}
    return LevelSteering(AttributeVectors(vecs, {"labeled": "x"}), layer, gain, 2.0)


def test_spec_adds_gain_times_level_distance_for_explicit_levels_only():
    ls = level_steering()
    assert ls.spec(None) is None and ls.spec({}) is None
    assert ls.spec({"verbosity": 2}) is None  # the middle of the scale: nothing to steer
    assert ls.spec({"quality": 4, "verbosity": None}) is None  # no vector / not requested
    h = torch.zeros(1, H)
    v = ls.vectors.vectors["verbosity"][1]
    for level in (0, 1, 3, 4):
        out = ls.spec({"verbosity": level}).layers[1].apply(h)
        assert torch.allclose(out[0], 2.0 * (level - 2) * v, atol=1e-5)  # h + g (l - c) v, the norm folded back in
    both = ls.spec({"verbosity": 4, "humor": 0}).layers[1].apply(h)
    assert torch.allclose(both[0], 4 * v - 4 * ls.vectors.vectors["humor"][1], atol=1e-5)  # the moves add up
    # cached by levels: a batch of rows shares one spec object per distinct request (the hooks loop over them)
    assert ls.spec({"verbosity": 4.0}) is ls.spec({"verbosity": 4, "humor": 2})


def test_save_load_round_trip(tmp_path):
    ls = level_steering(gain=1.5)
    assert LevelSteering.load(tmp_path) is None  # a checkpoint without it
    ls.save(tmp_path)
    back = LevelSteering.load(tmp_path)
    assert (back.layer, back.gain, back.center, back.attributes) == (1, 1.5, 2.0, ["verbosity", "humor"])
    for a in ls.attributes:
        assert torch.equal(back.vectors.vectors[a][1], ls.vectors.vectors[a][1])
    assert json.loads((tmp_path / LEVEL_DIR / "level_steering.json").read_text())["gain"] == 1.5


def test_a_policy_trained_further_keeps_the_vectors(tmp_path):
    assert not copy_level_steering(tmp_path / "none", tmp_path / "b")  # nothing to carry
    level_steering().save(tmp_path / "a")
    assert copy_level_steering(tmp_path / "a", tmp_path / "b")
    a, b = LevelSteering.load(tmp_path / "a"), LevelSteering.load(tmp_path / "b")
    assert b.describe() == a.describe() and torch.equal(b.vectors.vectors["humor"][1], a.vectors.vectors["humor"][1])


def test_merge_keeps_both_and_refuses_mixed_positions():
    ls = level_steering()
    a = ls.spec({"verbosity": 4})
    own = SteeringSpec.add(1, torch.ones(H), 3.0)
    assert merge(None, a) is a and merge(a, None) is a
    m = merge(own, a)
    h = torch.zeros(1, H)
    assert torch.allclose(m.layers[1].apply(h), own.layers[1].apply(h) + a.layers[1].apply(h), atol=1e-5)
    with pytest.raises(ConfigError, match="positions"):
        merge(SteeringSpec.add(1, torch.ones(H), 1.0, positions="prompt"), a)


def test_check_for_run_needs_a_labeled_file_and_steerable_attributes():
    canonical = [{"format": "canonical", "path": "runs/label/labeled.jsonl"}]
    assert check_for_run({"attributes": []}, canonical, ["verbosity"]) is None  # off
    assert check_for_run({"attributes": ["verbosity"]}, canonical, ["verbosity"]) == "runs/label/labeled.jsonl"
    with pytest.raises(ConfigError, match="level_steering.data"):
        check_for_run({"attributes": ["verbosity"]}, [{"format": "helpsteer2", "path": "x"}], ["verbosity"])
    with pytest.raises(ConfigError, match="not steerable"):
        check_for_run({"attributes": ["humor"]}, canonical, ["verbosity"])


# ===== one real SFT run: the checkpoint carries its vectors and steers with them ==================
@pytest.fixture(scope="module")
def steered_sft(tiny_model_dir, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("level_sft")
    labeled = base / "labeled.jsonl"
    conversations, _ = load_mixture([{"format": "helpsteer2", "path": HS2}], BUILTIN_SCHEMAS["steerlm9"])
    labeled.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, base / "sft"), "model.lora.save_merged=true",
               f"data.train=[{{format: canonical, path: {labeled}}}]", "level_steering.attributes=[verbosity,helpfulness]",
               "level_steering.max_per_side=8", "level_steering.gain=50")
    return base / "sft"


def test_sft_saves_level_steering_in_both_checkpoints(steered_sft, tmp_path):
    from steerlm.report import sft_section

    assert "Level steering: the policy's own vectors for verbosity, helpfulness" in \
        json.dumps(sft_section(steered_sft, tmp_path), default=str)
    summary = json.loads((steered_sft / "summary.json").read_text())["level_steering"]
    assert summary["attributes"] == ["verbosity", "helpfulness"] and summary["gain"] == 50.0
    val_ids = {json.loads(line)["id"] for line in (steered_sft / "validation.jsonl").read_text().splitlines()}
    assert val_ids  # the held-out conversations exist, and the vectors did not use them
    assert summary["vectors"]["attributes"]["verbosity"]["high"] == 8
    for d in ("model", "merged"):
        ls = LevelSteering.load(steered_sft / d)
        assert ls is not None and ls.layer == summary["layer"] and ls.attributes == ["verbosity", "helpfulness"]


def test_generate_and_conditioning_follow_the_level_vectors(steered_sft):
    from steerlm.conditioning import measure
    from steerlm.steerable import SteerableModel

    torch.set_num_threads(1)
    policy = SteerableModel.load(str(steered_sft / "model"), device="cpu")
    assert policy.level_steering is not None
    greedy = dict(max_new_tokens=8, do_sample=False, progress=False)
    prompts = ["What is DNS?", "Name a color."]
    on = policy.generate(prompts, {"verbosity": 4}, **greedy)
    off = policy.generate(prompts, {"verbosity": 4}, level_steering=False, **greedy)
    assert [o["ids"] for o in on] != [o["ids"] for o in off]  # gain 50: the vectors move the answer
    middle = policy.generate(prompts, {"verbosity": 2}, **greedy)  # the middle level adds nothing
    assert [o["ids"] for o in middle] == [o["ids"] for o in policy.generate(prompts, {"verbosity": 2},
                                                                            level_steering=False, **greedy)]
    convs, _ = load_mixture([{"format": "canonical", "path": str(steered_sft / "validation.jsonl")}], policy.schema)
    kw = dict(device=policy.device, n_max=6, n_boot=50)
    args = (policy.model, policy.tokenizer, policy.format, policy.schema, convs, ["verbosity"], [0, 4])
    plain = measure(*args, **kw)["attributes"]["verbosity"]
    none = measure(*args, **kw, steering_of=lambda a, v: None)["attributes"]["verbosity"]
    steered = measure(*args, **kw, steering_of=lambda a, v: policy.level_steering.spec({a: v}))["attributes"]["verbosity"]
    assert none["mean_abs_slope"] == pytest.approx(plain["mean_abs_slope"], rel=1e-6)  # the per-level path is the same
    assert steered["mean_abs_slope"] > 10 * plain["mean_abs_slope"]  # gain 50 dominates what the string does


def test_sft_refuses_level_steering_without_a_labeled_file(tiny_model_dir, tmp_path):
    proc = run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "sft"),
                      "level_steering.attributes=[verbosity]", check=False)
    assert_one_error(proc.returncode, proc.stderr, "level_steering.data")
    assert not (tmp_path / "sft" / "model").exists()  # refused before training


def test_evaluate_reports_the_vectors_and_the_string_alone(steered_sft, tiny_model_dir, tmp_path):
    from conftest import tiny_reward_overrides
    from steerlm.report import evaluate_section

    rm = tmp_path / "rm"
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, rm, f"data.train=[{{format: helpsteer2, path: {HS2}}}]"))
    out = tmp_path / "eval"
    run_recipe("evaluate", f"model.path={steered_sft / 'model'}", f"rm={rm / 'model'}", f"output_dir={out}", "n_prompts=3",
               "levels=[0,4]", "attributes=[verbosity]", "generation.max_new_tokens=8", "n_boot=100",
               f"conditioning.data=[{{format: canonical, path: {steered_sft / 'validation.jsonl'}}}]", "conditioning.n=6",
               "conditioning.max_length=2048", "conditioning.levels=[0,4]")
    result = json.loads((out / "steerability.json").read_text())
    assert set(result["methods"]) == {"ac_sft", "ac_sft_string"}
    assert result["level_steering"]["attributes"] == ["verbosity", "helpfulness"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    on = {(s["prompt_id"], s["level"], s["sample"]): s["response"] for s in samples if s["method"] == "ac_sft"}
    off = {(s["prompt_id"], s["level"], s["sample"]): s["response"] for s in samples if s["method"] == "ac_sft_string"}
    assert on.keys() == off.keys() and on != off  # the same jobs; the vectors (gain 50) change the answers
    cond = result["conditioning"]
    assert set(cond) == {"policy", "policy_string", "base"}
    assert cond["policy"]["attributes"]["verbosity"]["mean_abs_slope"] != \
        cond["policy_string"]["attributes"]["verbosity"]["mean_abs_slope"]
    text = json.dumps(evaluate_section(out, 1, 100), default=str)
    assert "string alone" in text and "ac_sft_string" in text


def test_generate_recipe_steers_only_the_attributes_it_is_given(steered_sft, tmp_path):
    common = [f"model.path={steered_sft / 'model'}", "prompt=What is DNS?", "generation.max_new_tokens=8"]
    rows = {}
    for name, extra in {"on": ["attributes.verbosity=4"], "off": ["attributes.verbosity=4", "level_steering=false"],
                        "defaults": [], "defaults_off": ["level_steering=false"]}.items():
        run_recipe("generate", *common, *extra, f"output={tmp_path / name}.jsonl")
        rows[name] = json.loads((tmp_path / f"{name}.jsonl").read_text())
    assert rows["on"]["attributes"]["verbosity"] == rows["off"]["attributes"]["verbosity"] == 4.0
    assert rows["on"]["response"] != rows["off"]["response"]  # gain 50 on verbosity
    # the card's defaults (helpfulness 4: +100 v if it were applied) are not requested: no vector moves
    assert rows["defaults"]["response"] == rows["defaults_off"]["response"]


def test_server_applies_the_checkpoint_vectors_like_generate(steered_sft):
    from test_serve import chat, post, serve

    from steerlm.steerable import SteerableModel

    torch.set_num_threads(1)
    policy = SteerableModel.load(str(steered_sft / "model"), device="cpu")
    url, _, stop = serve(steered_sft / "model", max_tokens=8)
    try:
        for attrs in ({"verbosity": 4}, {"verbosity": 0, "helpfulness": 1}):
            code, body = post(url, chat("What is DNS?", max_tokens=8, attributes=attrs))
            assert code == 200, body
            want = policy.generate(["What is DNS?"], [attrs], max_new_tokens=8, progress=False)[0]
            alone = policy.generate(["What is DNS?"], [attrs], max_new_tokens=8, progress=False, level_steering=False)[0]
            assert body["choices"][0]["message"]["content"] == want["text"] != alone["text"]
    finally:
        stop()
