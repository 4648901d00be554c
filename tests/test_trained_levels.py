"""Trained level vectors (`sft.level_steering.train`, `steerlm.steering.trained_levels`): the level steering's
vectors as parameters of the SFT loss. The per-token offsets, a known answer (synthetic data whose response is
decided by its humor label: the trained vectors make held-out answers most likely under their own level, far
more than the string alone learns in the same steps), the checkpoint (vectors saved, never in the weights),
resume, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import assert_one_error, run_recipe, tiny_sft_overrides
from steerlm.steering.levels import LevelSteering
from steerlm.steering.trained_levels import batch_offsets, token_offsets
from test_conditioning import strength, synthetic, write

V, H, Q = "verbosity", "humor", "quality"


def test_token_offsets_give_each_turn_its_own_level():
    # turn 1: tokens 0-4 (prompt 0-2, response 3-4); turn 2: tokens 5-9 (prompt 5-7, response 8-9)
    mask = [False, False, False, True, True, False, False, False, True, True]
    out = token_offsets(mask, [{V: 4.0, H: 1.0}, {V: 0.0}], [V, H], centers=[2.0, 2.0])
    assert out[:5].tolist() == [[2.0, -1.0]] * 5
    assert out[5:].tolist() == [[-2.0, 0.0]] * 5  # humor unlabeled in turn 2 (or dropped): no offset
    single = token_offsets([False, True, True, False], [{V: 3.0}], [V], centers=[2.0])
    assert single.tolist() == [[1.0]] * 4  # the trailing token takes the last turn's level
    # spans that do not pair with the assistant turns: every token takes the last turn's labels
    assert token_offsets(mask, [{V: 4.0}], [V], centers=[2.0]).tolist() == [[2.0]] * 10
    assert token_offsets([False, True], [{H: 1.0}], [H], centers=[0.5]).tolist() == [[0.5]] * 2  # around c_a


def test_train_mean_centres_and_their_level_steering(tmp_path):
    from steerlm.steering.trained_levels import TrainedLevels, train_label_mean

    ex = [{"turns": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "labels": {H: 0.0}}]},
          {"turns": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "labels": {H: 3.0}}]},
          {"turns": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "labels": None}]}]
    assert train_label_mean(ex, H, 2.0) == 1.5 and train_label_mean(ex, V, 2.0) == 2.0  # unlabeled: the midpoint
    t = TrainedLevels([V, H], 4, 0, [2.0, 1.5], torch.ones(2, 4))
    ls = t.level_steering()
    assert ls.spec({H: 1.5}) is None and ls.spec({V: 2.0}) is None  # each attribute's own centre moves nothing
    assert ls.spec({H: 3.5}).layers[0].ops[0].scale == pytest.approx(2.0 * 2.0)  # (3.5 - 1.5) * |v| (|v| = 2)
    ls.save(tmp_path)
    back = LevelSteering.load(tmp_path)
    assert back.center == {V: 2.0, H: 1.5} and back.spec({H: 1.5}) is None


def test_batch_offsets_follow_the_token_layout():
    offs = [torch.full((3, 1), 1.0), torch.full((2, 1), -2.0), torch.full((4, 1), 0.5)]
    packed = batch_offsets([[0, 1], [2]], offs, packing=True, length=6)
    assert packed[0, :, 0].tolist() == [1, 1, 1, -2, -2, 0] and packed[1, :, 0].tolist() == [0.5] * 4 + [0, 0]
    padded = batch_offsets([[1], [2]], offs, packing=False, length=4)
    assert padded[0, :, 0].tolist() == [-2, -2, 0, 0] and padded[1, :, 0].tolist() == [0.5] * 4


def known_answer_run(tiny_model_dir, tmp_path, name, *extra):
    data = write(synthetic(200, seed=1), tmp_path / "true.jsonl")
    run_dir = tmp_path / name
    run_recipe("train_sft", f"model.path={tiny_model_dir}", f"run_dir={run_dir}",
               f"data.train=[{{format: canonical, path: {data}}}]", "engine.precision=fp32", "optim.lr=3e-3",
               "optim.warmup_steps=2", "train.max_steps=40", "train.global_batch_size=16", "train.save_every=0",
               "eval.val_fraction=0.0", "eval.conditioning.n=0", *extra)
    return run_dir


def test_trained_vectors_make_each_answer_most_likely_under_its_own_level(tiny_model_dir, tmp_path):
    """Same data, LoRA, steps and seed; the vectors start at 0, so all they know comes from the SFT loss."""
    plain = strength(known_answer_run(tiny_model_dir, tmp_path, "plain") / "model")
    run = known_answer_run(tiny_model_dir, tmp_path, "trained", "level_steering.attributes=[humor]",
                           "level_steering.train=true", "level_steering.init=zeros", "level_steering.lr=0.05")
    ls = LevelSteering.load(run / "model")
    assert ls.attributes == [H] and ls.gain == 1.0 and ls.positions == "all"
    steered = strength(run / "model", steering_of=lambda a, v: ls.spec({a: v}))
    assert steered["verdict"] == "follows"
    assert steered["strength"]["lo"] > plain["strength"]["hi"]
    assert steered["gain"]["value"] > 3 * plain["gain"]["value"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    norms = [m["train/level_vector_norm/humor"] for m in metrics if "train/level_vector_norm/humor" in m]
    assert norms[0] < norms[-1]  # learned from 0


def test_checkpoint_resume_and_export(tiny_model_dir, tmp_path, hs2_labeled):
    common = (f"data.train=[{{format: canonical, path: {hs2_labeled}}}]", "level_steering.attributes=[verbosity]",
              "level_steering.train=true", "level_steering.max_per_side=8", "model.lora.save_merged=true")
    straight = tmp_path / "straight"
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, straight, *common, "train.max_steps=4",
                                                "level_steering.inference_gain=2"))
    cut = tmp_path / "cut"
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, cut, *common, "train.max_steps=2",
                                                "train.save_every=2", "train.keep_checkpoints=2"))
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, cut, *common, "train.max_steps=4", "resume=auto"))
    a = LevelSteering.load(straight / "model").vectors.vectors[V]
    b = LevelSteering.load(cut / "model").vectors.vectors[V]
    layer = LevelSteering.load(straight / "model").layer
    assert torch.allclose(a[layer], b[layer], atol=1e-6)  # V and its optimizer state came back from the checkpoint
    assert LevelSteering.load(straight / "model").gain == 2.0 and LevelSteering.load(cut / "model").gain == 1.0
    summary = json.loads((straight / "summary.json").read_text())["level_steering"]
    assert summary["trained"] and summary["norms"][V] > 0
    from steerlm.report import sft_section

    assert "learned with the SFT loss" in json.dumps(sft_section(straight, tmp_path), default=str)
    for d in ("model", "merged"):
        assert LevelSteering.load(straight / d) is not None
    for f in [*(straight / "merged").glob("*.safetensors"), *(straight / "model").glob("*.safetensors")]:
        with safe_open(str(f), "pt") as st:
            assert not any("level_vectors" in k for k in st.keys())  # V ships as level steering only


@pytest.fixture(scope="module")
def hs2_labeled(tmp_path_factory):
    from conftest import HS2_SAMPLE
    from steerlm.attributes import BUILTIN_SCHEMAS
    from steerlm.data.sources import load_mixture

    conversations, _ = load_mixture([{"format": "helpsteer2", "path": HS2_SAMPLE}], BUILTIN_SCHEMAS["steerlm9"])
    return write(conversations, tmp_path_factory.mktemp("hs2") / "labeled.jsonl")


@pytest.mark.parametrize("extra, fragment", [
    (["contrast.weight=1"], "contrast.weight > 0"),
    (["level_steering.positions=prompt"], "positions must be all"),
])
def test_refusals(tiny_model_dir, tmp_path, hs2_labeled, extra, fragment):
    proc = run_recipe("train_sft", *tiny_sft_overrides(
        tiny_model_dir, tmp_path / "sft", f"data.train=[{{format: canonical, path: {hs2_labeled}}}]",
        "level_steering.attributes=[verbosity]", "level_steering.train=true", *extra), check=False)
    assert_one_error(proc.returncode, proc.stderr, "level_steering.train", fragment)


def test_ddp_learns_the_same_vectors_as_one_process(tiny_model_dir, tmp_path, hs2_labeled):
    """V is a parameter of the wrapped model: DDP averages its gradient like LoRA's (the global-batch loss makes
    the step the same at any world size)."""
    common = (f"data.train=[{{format: canonical, path: {hs2_labeled}}}]", "level_steering.attributes=[verbosity]",
              "level_steering.train=true", "level_steering.max_per_side=8")
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "one", *common))
    run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, tmp_path / "two", *common, "engine.strategy=ddp"),
               torchrun=2)
    one, two = (LevelSteering.load(tmp_path / d / "model") for d in ("one", "two"))
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    v1, v2 = one.vectors.vectors[V][one.layer], two.vectors.vectors[V][two.layer]
    assert v1.norm() > 0 and torch.allclose(v1, v2, atol=1e-6)  # measured: max |difference| 1.9e-9


def test_inference_gain_without_trained_vectors_is_refused(tiny_model_dir, tmp_path, hs2_labeled):
    proc = run_recipe("train_sft", *tiny_sft_overrides(
        tiny_model_dir, tmp_path / "sft", f"data.train=[{{format: canonical, path: {hs2_labeled}}}]",
        "level_steering.attributes=[verbosity]", "level_steering.inference_gain=2"), check=False)
    assert_one_error(proc.returncode, proc.stderr, "level_steering.inference_gain", "level_steering.gain")
