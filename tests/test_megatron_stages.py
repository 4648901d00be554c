"""The reward and SFT stages with engine=megatron (TP=2, and DP=2) against engine=torch: same losses, same
gradient norms, and an exported HF checkpoint with the same weights. CPU, gloo, 2 torchrun processes; megatron-core
reaches the CPU through tests/megatron_recipe.py (the test-only redirect)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import HS2_SAMPLE, PY, REPO, run_recipe, tiny_reward_overrides
from steerlm.errors import ConfigError

pytest.importorskip("megatron.core", reason="pip install -e '.[megatron]'")


def run_megatron(recipe: str, *overrides: str, procs: int = 2, check: bool = True,
                 engine: bool = True) -> subprocess.CompletedProcess:
    launch = [PY] if procs == 1 else [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*launch, str(REPO / "tests" / "megatron_recipe.py"), recipe, *(["engine=megatron"] if engine else []),
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def curve(run_dir: Path) -> list[tuple[float, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]


def same_weights(a: Path, b: Path, loader, atol: float) -> float:
    sa, sb = loader(a).state_dict(), loader(b).state_dict()
    assert sa.keys() == sb.keys()
    diff = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert diff <= atol, diff
    return diff


DATA = f"data.train=[{{format: helpsteer2, path: {HS2_SAMPLE}}}]"


@pytest.fixture(scope="module")
def torch_rm(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny RM trained by the torch engine: the reference run (its model/ feeds the labeling test)."""
    out = tmp_path_factory.mktemp("megatron_stages") / "torch_rm"
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, out, DATA))
    return out


def test_reward_stage_tp2_equals_the_torch_engine(tiny_model_dir, torch_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    for name, split in (("tp2", ["engine.tensor_parallel=2"]), ("pp2", ["engine.pipeline_parallel=2"]),
                        ("tp2sp", ["engine.tensor_parallel=2", "engine.sequence_parallel=true",
                                   "model.gradient_checkpointing=true"])):  # and Megatron's recompute
        run_megatron("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / name, DATA), *split)
        ref, got = curve(torch_rm), curve(tmp_path / name)
        assert len(ref) == len(got) == 4
        for (l1, g1), (l2, g2) in zip(ref, got):  # the norm sums every shard once and replicated weights once
            assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-4), name
        # the Megatron-trained RM is a plain transformers checkpoint with the torch-trained weights (PP: the head
        # comes from the last stage)
        same_weights(torch_rm / "model", tmp_path / name / "model", AutoModelForSequenceClassification.from_pretrained,
                     atol=1e-3)
        a, b = (json.loads((d / "eval_metrics.json").read_text()) for d in (torch_rm, tmp_path / name))
        for attr, m in a["attributes"].items():
            assert b["attributes"][attr]["mse"] == pytest.approx(m["mse"], rel=1e-3), name
    summary = json.loads((tmp_path / "tp2" / "summary.json").read_text())
    assert summary["strategy"] == "megatron" and summary["tensor_parallel"] == 2
    assert json.loads((tmp_path / "tp2sp" / "summary.json").read_text())["sequence_parallel"] is True


def test_scaled_bt_from_the_stage1_rm_tp2_equals_the_torch_engine(tiny_model_dir, torch_rm, tmp_path):
    """HelpSteer2-Preference's chain on Megatron: a stage-1 RM checkpoint (trained head) -> scaled BT on pairs."""
    bt = [f"model.path={torch_rm / 'model'}", "loss.type=scaled_bt", "loss.pair_weights={quality: 1.0}",
          "data.pairs=[{format: oasst, path: data/oasst1/oasst1_validation_en.messages.jsonl.gz}]", "max_length=256",
          "optim.lr=1e-3"]
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "torch"), *bt)
    run_megatron("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "tp2"), *bt, "engine.tensor_parallel=2")
    run_megatron("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "pp2"), *bt, "engine.pipeline_parallel=2")
    ref = curve(tmp_path / "torch")
    for name in ("tp2", "pp2"):  # PP: a pair's chosen and rejected rows travel in one micro-batch
        got = curve(tmp_path / name)
        assert len(ref) == len(got) == 4
        for (l1, g1), (l2, g2) in zip(ref, got):
            assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-4), name
    acc = [json.loads((tmp_path / d / "eval_metrics.json").read_text())["pairwise_accuracy"]["preference_pairs"]
           for d in ("torch", "tp2", "pp2")]
    assert acc[0] == acc[1] == acc[2] and acc[0]["pairs"] >= 5


def test_label_stage_tp2_scores_like_the_torch_engine(torch_rm, tmp_path):
    """Labeling on Megatron: both TP ranks score every chunk in lockstep, one writes; the labels are the torch
    engine's (up to float reduction order), the rows and counts identical."""
    inputs = "input=[{format: oasst, path: data/oasst1/oasst1_validation_en.messages.jsonl.gz}]"
    common = [f"rm={torch_rm / 'model'}", inputs, "chunk_size=16", "max_length=256", "engine.precision=fp32"]
    run_recipe("label", *common, f"output_dir={tmp_path / 'torch'}")
    run_megatron("label", *common, f"output_dir={tmp_path / 'tp2'}", "engine.tensor_parallel=2")
    run_megatron("label", *common, f"output_dir={tmp_path / 'pp2'}", "engine.pipeline_parallel=2")
    run_megatron("label", *common, f"output_dir={tmp_path / 'tp2sp'}", "engine.tensor_parallel=2",
                 "engine.sequence_parallel=true")  # odd lengths: padded to a multiple of 2
    rows = {name: [json.loads(x) for x in (tmp_path / name / "labeled.jsonl").read_text().splitlines()]
            for name in ("torch", "tp2", "pp2", "tp2sp")}
    for name in ("tp2", "pp2", "tp2sp"):
        assert [r["id"] for r in rows["torch"]] == [r["id"] for r in rows[name]] and len(rows["torch"]) > 100
        diffs = [abs(a - b) for r1, r2 in zip(rows["torch"], rows[name]) for t1, t2 in zip(r1["turns"], r2["turns"])
                 if t1.get("scores") is not None for a, b in zip(t1["scores"].values(), t2["scores"].values())]
        assert diffs and max(diffs) < 1e-4, (name, max(diffs))
        s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("torch", name))
        for key in ("rows", "turns_scored", "skipped", "tokens", "chunks"):
            assert s1[key] == s2[key], (name, key)


SFT = ["engine.precision=fp32", f"data.train=[{{format: helpsteer2, path: {HS2_SAMPLE}}}]", "max_length=2048",
       "pack_length=null", "packing=false", "model.lora.enabled=false", "train.max_steps=3", "train.global_batch_size=8",
       "train.save_every=0", "optim.lr=1e-3"]


def sft_matches_torch(model_dir: Path, tmp_path: Path, splits: dict[str, list[str]], extra: list[str] = ()) -> None:
    """Train the torch engine and each Megatron split; equal loss and grad-norm curves, equal exported weights."""
    from transformers import AutoModelForCausalLM

    base = [f"model.path={model_dir}", *SFT, *extra]
    run_recipe("train_sft", *base, f"run_dir={tmp_path / 'torch'}")
    for name, split in splits.items():
        run_megatron("train_sft", *base, f"run_dir={tmp_path / name}", *split)
    ref = curve(tmp_path / "torch")
    for name in splits:
        got = curve(tmp_path / name)
        assert len(got) == len(ref) == 3
        for (l1, g1), (l2, g2) in zip(ref, got):
            assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-4), name
        same_weights(tmp_path / "torch" / "model", tmp_path / name / "model", AutoModelForCausalLM.from_pretrained,
                     atol=1e-3)
        card = json.loads((tmp_path / name / "model" / "steerlm_sft.json").read_text())
        assert card["lora"] is False and card["steerable_attributes"]
        val = [json.loads((tmp_path / d / "summary.json").read_text())["validation_loss"] for d in ("torch", name)]
        assert val[1] == pytest.approx(val[0], rel=1e-5), name


def test_packed_sft_tp2_with_sequence_parallelism_and_pp2_equal_the_torch_engine(tiny_model_dir, tmp_path):
    """Packed rows (several conversations per row): Megatron masks attention block-diagonally and RoPE stays
    relative, so the packed loss is the torch engine's packed (per-conversation sdpa) loss; with sequence
    parallelism and recompute too (measured: a plain causal mask is 1e-4 off at step 1)."""
    packed = ["packing=true", "pack_length=1024"]
    sft_matches_torch(tiny_model_dir, tmp_path, {
        "tp2sp": ["engine.tensor_parallel=2", "engine.sequence_parallel=true",
                  "model.gradient_checkpointing=true"],  # Megatron's full-layer recompute
        "pp2": ["engine.pipeline_parallel=2"]}, extra=packed)
    summary = json.loads((tmp_path / "tp2sp" / "summary.json").read_text())
    assert summary["packing_efficiency"] > 0.9 and summary["sequence_parallel"] is True


def test_sft_stage_tp2_dp2_and_pp2_equal_the_torch_engine(tiny_model_dir, tmp_path):
    sft_matches_torch(tiny_model_dir, tmp_path, {"tp2": ["engine.tensor_parallel=2"],
                                                 "dp2": ["engine.tensor_parallel=1"],  # 2 replicas
                                                 "pp2": ["engine.pipeline_parallel=2"]})  # 1F1B, 2 stages
    dp2 = json.loads((tmp_path / "dp2" / "summary.json").read_text())
    assert dp2["world_size"] == 2 and dp2["tensor_parallel"] == 1  # world_size: data-parallel replicas


def test_sft_pp2_keeps_tied_embeddings_tied(tiny_model_dir, tmp_path):
    """Tied input/output embeddings split over 2 stages: the last stage's copy gets the summed gradient."""
    import shutil

    from transformers import AutoModelForCausalLM

    from steerlm.engines.megatron.convert import DecoderShape, hf_to_megatron

    tied = tmp_path / "tied_model"
    shutil.copytree(tiny_model_dir, tied)  # tokenizer and all
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    hf = model.state_dict()
    model.config.tie_word_embeddings = True
    # a config that says tied over a checkpoint whose lm_head differs: transformers keeps them apart, so do we
    with pytest.raises(ConfigError, match="set tie_word_embeddings=false"):
        hf_to_megatron(hf, DecoderShape.from_hf(model.config))
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tied)
    sft_matches_torch(tied, tmp_path, {"pp2": ["engine.pipeline_parallel=2"]})


def test_lora_sft_is_split_independent_resumes_across_splits_and_exports_a_peft_adapter(tiny_model_dir, tmp_path):
    """LoRA on Megatron's parallel linears (q/k/v and gate/up share their A, as the linears are fused): the same
    curve at TP 1, TP 2 and PP 2; a PP 2 checkpoint resumes at TP 2 (the adapter re-sliced); model/ is a peft
    adapter of the base that transformers + peft load, and merged/ is the base with it merged in."""
    from transformers import AutoModelForCausalLM

    from steerlm.models.policy import load_for_generation

    base = [f"model.path={tiny_model_dir}", *SFT[:5], "model.lora.enabled=true", "model.lora.r=4",
            "train.max_steps=4", "train.global_batch_size=8", "optim.lr=1e-2"]
    run_megatron("train_sft", *base, f"run_dir={tmp_path / 'tp1'}", procs=1)
    run_megatron("train_sft", *base, f"run_dir={tmp_path / 'tp2'}", "engine.tensor_parallel=2")
    run_megatron("train_sft", *base, f"run_dir={tmp_path / 'pp2'}", "engine.pipeline_parallel=2", "train.save_every=2")
    run_megatron("train_sft", *base, f"run_dir={tmp_path / 'resumed'}", "engine.tensor_parallel=2",
                 f"resume={tmp_path / 'pp2' / 'checkpoints' / 'step_00000002'}")
    ref = curve(tmp_path / "tp1")
    assert len(ref) == 4 and ref[-1][0] < ref[0][0] - 0.05, ref
    for name in ("tp2", "pp2"):
        for (l1, g1), (l2, g2) in zip(ref, curve(tmp_path / name)):
            assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-4), name
    assert [round(x, 5) for x, _ in curve(tmp_path / "resumed")] == [round(x, 5) for x, _ in ref[2:]]
    summary = json.loads((tmp_path / "tp2" / "summary.json").read_text())
    tp1 = json.loads((tmp_path / "tp1" / "summary.json").read_text())
    assert summary["lora"] is True and summary["trainable_params"] == tp1["trainable_params"] > 0  # whole model
    card = json.loads((tmp_path / "tp2" / "model" / "steerlm_sft.json").read_text())
    assert card["lora"] is True and (tmp_path / "tp2" / "model" / "adapter_config.json").exists()
    # the adapter on its base (peft) is the merged model; the base weights themselves did not move
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n / "merged").state_dict() for n in ("tp1", "tp2", "pp2")}
    from_adapter = load_for_generation(str(tmp_path / "tp2" / "model")).state_dict()
    assert all(torch.allclose(from_adapter[k], merged["tp2"][k], atol=1e-6) for k in initial)
    for name in ("tp2", "pp2"):
        assert all(torch.allclose(merged[name][k], merged["tp1"][k], atol=1e-5) for k in initial), name
    moved = [k for k in initial if not torch.equal(initial[k], merged["tp2"][k])]
    assert moved and all(k.endswith("proj.weight") for k in moved), moved  # only the adapted linears changed
    proc = run_megatron("train_sft", *base, "model.lora.target_modules=[q_proj,v_proj]", f"run_dir={tmp_path / 'bad'}",
                        procs=1, check=False)
    assert proc.returncode == 2 and "must name all of ['k_proj', 'q_proj', 'v_proj']" in proc.stderr


def test_frozen_backbone_rm_at_pp2_equals_the_torch_engine(tiny_model_dir, tmp_path):
    """A frozen backbone split over 2 stages: the features go through the schedule (forward only) and are broadcast
    from the last stage, then every stage trains the same head on them: the torch engine's curve and metrics."""
    from transformers import AutoModelForSequenceClassification

    frozen = ["model.freeze_backbone=true", "optim.lr=1e-2"]
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "torch", DATA), *frozen)
    run_megatron("train_reward", *tiny_reward_overrides(tiny_model_dir, tmp_path / "pp2", DATA), *frozen,
                 "engine.pipeline_parallel=2")
    ref, got = curve(tmp_path / "torch"), curve(tmp_path / "pp2")
    assert len(ref) == len(got) == 4 and ref[-1][0] < ref[0][0]
    for (l1, g1), (l2, g2) in zip(ref, got):
        assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-4)
    same_weights(tmp_path / "torch" / "model", tmp_path / "pp2" / "model",
                 AutoModelForSequenceClassification.from_pretrained, atol=1e-5)
    a, b = (json.loads((tmp_path / d / "eval_metrics.json").read_text()) for d in ("torch", "pp2"))
    for attr, m in a["attributes"].items():
        assert b["attributes"][attr]["mse"] == pytest.approx(m["mse"], rel=1e-4)
    summary = json.loads((tmp_path / "pp2" / "summary.json").read_text())
    assert summary["frozen_backbone"] is True and summary["pipeline_parallel"] == 2


def test_checkpoints_resume_at_another_tp_pp_split(tiny_model_dir, tmp_path):
    """Checkpoints are one shard per rank; at another split they are re-sliced through the HF mapping: a run saved
    at TP 2 resumes at PP 2 (SFT) and one saved at PP 2 resumes at TP 2 (reward, whose head lives on the last
    stage) onto the uninterrupted run's curve."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = [f"model.path={tiny_model_dir}", *SFT[:-4], "train.max_steps=4", "train.global_batch_size=8",
           "optim.lr=1e-3", "train.save_every=2"]
    rm = [*tiny_reward_overrides(tiny_model_dir, tmp_path / "unused", DATA), "train.save_every=2"]
    cases = [("train_sft", sft, "engine.tensor_parallel=2", "engine.pipeline_parallel=2", AutoModelForCausalLM),
             ("train_reward", rm, "engine.pipeline_parallel=2", "engine.tensor_parallel=2",
              AutoModelForSequenceClassification),
             # DP 2: the distributed optimizer's halves meet in replica 0's shard, then TP 2 re-slices them
             ("train_sft", sft, "engine.tensor_parallel=1", "engine.tensor_parallel=2", AutoModelForCausalLM),
             # the same split: each rank reads its own shard (the head: every stage's own copy)
             ("train_reward", rm, "engine.pipeline_parallel=2", "engine.pipeline_parallel=2",
              AutoModelForSequenceClassification)]
    for k, (recipe, overrides, first, second, loader) in enumerate(cases):
        full, resumed = tmp_path / f"{recipe}_{k}_full", tmp_path / f"{recipe}_{k}_resumed"
        run_megatron(recipe, *overrides, f"run_dir={full}", first)
        run_megatron(recipe, *overrides, f"run_dir={resumed}", second, f"resume={full / 'checkpoints' / 'step_00000002'}")
        ref, got = curve(full), curve(resumed)
        assert [round(x, 5) for x, _ in got] == [round(x, 5) for x, _ in ref[2:]], (recipe, ref, got)
        same_weights(full / "model", resumed / "model", loader.from_pretrained, atol=1e-5)


def test_distributed_optimizer_shards_adamw_and_its_fp32_masters_keep_small_bf16_updates(tiny_model_dir, tmp_path):
    """bf16 weights, lr 1e-5: a plain AdamW step is below half a bf16 ulp for most weights (|w| > 2.6e-3) and is
    lost, so the model stalls; the distributed optimizer's fp32 masters accumulate the steps. Its state is split
    over the 2 replicas, and a bf16 run resumes onto its own curve because the masters are checkpointed.
    Measured (10 steps): moved along the fp32 run's update 0.60 with masters vs 0.13 without; final loss 6.2460
    vs 6.2481 (fp32: 6.2443)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = [f"model.path={tiny_model_dir}", *SFT[:6], "train.max_steps=10", "train.global_batch_size=8",
            "optim.lr=1e-5", "optim.warmup_steps=0", "engine.tensor_parallel=1"]  # 2 processes: DP 2
    runs = {"fp32": ["model.dtype=float32"], "master": ["model.dtype=bfloat16", "train.save_every=4"],
            "plain": ["model.dtype=bfloat16", "engine.distributed_optimizer=false"]}
    out = {name: run_megatron("train_sft", *base, *extra, f"run_dir={tmp_path / name}").stdout
           for name, extra in runs.items()}
    held = [int(x.replace(",", "")) for x in
            re.search(r"AdamW state for ([\d,]+) of ([\d,]+) parameters", out["master"]).groups()]
    assert abs(held[0] - held[1] / 2) <= 0.1 * held[1] and "fp32 master weights" in out["master"]
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    w = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n / "model", dtype=torch.float32).state_dict()
         for n in runs}
    step = {k: w["fp32"][k] - init[k] for k in init}
    along = {n: sum(float(((w[n][k] - init[k]) * step[k]).sum()) for k in init) /
             sum(float((step[k] ** 2).sum()) for k in init) for n in ("master", "plain")}
    assert along["master"] > 0.45 and along["plain"] < 0.3, along
    loss = {n: curve(tmp_path / n)[-1][0] for n in runs}
    assert loss["fp32"] < loss["master"] < loss["plain"], loss
    # the fp32 masters are in the checkpoint (HF names), and resuming from step 4 continues the same curve
    ckpt = tmp_path / "master" / "checkpoints" / "step_00000004"
    shard = load_file(str(ckpt / "shard_pp00_tp00.safetensors"))  # replica 0 wrote it, holding both halves' state
    kinds = {k.split("/")[0] for k in shard}
    assert kinds == {"weight", "exp_avg", "exp_avg_sq", "master"}, kinds
    names = {kind: {k.split("/", 1)[1] for k in shard if k.startswith(f"{kind}/")} for kind in kinds}
    assert all(names[kind] == names["weight"] for kind in kinds) and len(names["weight"]) > 6
    norm = "decoder.final_layernorm.weight"
    assert shard[f"master/{norm}"].dtype == torch.float32 and shard[f"weight/{norm}"].dtype == torch.bfloat16
    run_megatron("train_sft", *base, *runs["master"], f"run_dir={tmp_path / 'resumed'}", f"resume={ckpt}")
    assert [round(x, 6) for x, _ in curve(tmp_path / "resumed")] == [round(x, 6) for x, _ in curve(tmp_path / "master")[4:]]


def test_bf16_autocast_request_is_dropped_with_a_notice(tiny_model_dir, tmp_path):
    """sft.yaml asks for bf16 autocast; Megatron's layers cannot autocast (mixed-dtype backward), so the stage says
    so and computes in model.dtype instead of crashing."""
    base = [f"model.path={tiny_model_dir}", *[o for o in SFT if not o.startswith("engine.precision")]]
    proc = run_megatron("train_sft", *base, "engine.precision=bf16", "train.max_steps=2", f"run_dir={tmp_path}", procs=1)
    assert "engine=megatron: no autocast (engine.precision=bf16 ignored); computing in model.dtype=float32" in proc.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_pipeline_command_runs_stages_on_megatron_each_with_its_own_split(tiny_model_dir, tmp_path):
    """One torchrun, one process group: reward at TP 2, label at PP 2, SFT at TP 2, evaluate on the torch engine
    (rank 0); Megatron's groups are rebuilt per stage. The same command again skips every stage."""
    from test_pipeline import plan_lines, tiny_overrides

    megatron = ["reward.engine.strategy=megatron", "+reward.engine.tensor_parallel=2",
                "label.engine.strategy=megatron", "+label.engine.pipeline_parallel=2",
                "sft.engine.strategy=megatron", "+sft.engine.tensor_parallel=2", "sft.model.lora.enabled=false",
                "sft.packing=false"]
    args = [*tiny_overrides(tiny_model_dir, tmp_path / "p"), *megatron]
    run_megatron("pipeline", *args, engine=False)
    for stage, split in (("reward", (2, 1)), ("label", (1, 2)), ("sft", (2, 1))):
        summary = json.loads((tmp_path / "p" / stage / "summary.json").read_text())
        assert (summary["tensor_parallel"], summary["pipeline_parallel"], summary["world_size"]) == (*split, 1), stage
    assert (tmp_path / "p" / "report.md").exists() and (tmp_path / "p" / "sft" / "model" / "model.safetensors").exists()
    again = run_megatron("pipeline", *args, engine=False)
    assert {a for a, _ in plan_lines(again.stdout).values()} == {"skip"}
