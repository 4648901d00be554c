"""engine=megatron on CPU: HF <-> Megatron conversion, TP=2 and PP=2 (gloo, 2 torchrun processes) against HF and TP=1.

The worker (tests/megatron_worker.py) runs megatron-core through the test-only CPU redirect (tests/megatron_cpu.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PY, REPO
from steerlm.engines.megatron.convert import DecoderShape, hf_to_megatron, megatron_to_hf, rope_settings
from steerlm.errors import ConfigError

pytest.importorskip("megatron.core", reason="pip install -e '.[megatron]'")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def tiny_hf(model_type: str, out: Path, **changes) -> Path:
    """A random tiny decoder of `model_type` saved as an HF checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **changes})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases, so a mapping that drops or swaps them shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("megatron")
    return {"llama": tiny_hf("llama", base / "llama"),
            "qwen2_tied": tiny_hf("qwen2", base / "qwen2", tie_word_embeddings=True),
            "qwen3": tiny_hf("qwen3", base / "qwen3", head_dim=32, tie_word_embeddings=False),
            "mistral": tiny_hf("mistral", base / "mistral", sliding_window=None)}


def run_worker(hf_dir: Path, out: Path, *, tp: int, pp: int = 1, procs: int, extra: tuple = ()) -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           str(REPO / "tests" / "megatron_worker.py"), str(hf_dir), str(out), "--tp", str(tp), "--pp", str(pp), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied", "qwen3", "mistral"])
def test_hf_megatron_hf_round_trip_is_exact_for_every_tp_pp_split(models, kind):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf = load_file(str(models[kind] / "model.safetensors"))
    shape = DecoderShape.from_hf(AutoConfig.from_pretrained(models[kind]))
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        shards = {(p, t): hf_to_megatron(hf, shape, tp, t, pp, p) for p in range(pp) for t in range(tp)}
        back = megatron_to_hf(shards, shape, tp, pp)
        want = {k: v for k, v in hf.items() if not (shape.tied and k == "lm_head.weight")}
        assert back.keys() == want.keys(), (tp, pp)
        assert all(torch.equal(back[k], want[k]) for k in want), (tp, pp)
    # TP=2 splits the query groups: each rank holds 1 of the 2 groups' q heads, k and v
    r1 = hf_to_megatron(hf, shape, 2, 1)["decoder.layers.0.self_attention.linear_qkv.weight"]
    per = shape.heads // shape.groups * shape.head_dim
    assert torch.equal(r1[:per], hf["model.layers.0.self_attn.q_proj.weight"][per:2 * per])
    assert torch.equal(r1[per:per + shape.head_dim], hf["model.layers.0.self_attn.k_proj.weight"][shape.head_dim:])


def test_tp2_and_pp2_match_hf_and_tp1_and_export_to_hf(models, tmp_path):
    from transformers import AutoModelForCausalLM

    tp1 = run_worker(models["llama"], tmp_path / "tp1.json", tp=1, procs=1)
    tp2 = run_worker(models["llama"], tmp_path / "tp2.json", tp=2, procs=2)
    pp2 = run_worker(models["llama"], tmp_path / "pp2.json", tp=1, pp=2, procs=2)
    for r in (tp1, tp2):
        assert r["logits_max_abs_diff"] <= 1e-4 and r["hidden_max_abs_diff"] <= 1e-4, r
    for r in (tp1, tp2, pp2):
        assert r["roundtrip_exact"] and r["roundtrip_keys_equal"], r
    assert tp2["ranks"]["tp"] == 2 and pp2["ranks"]["pp"] == 2
    # the same training steps: losses agree across TP=1, TP=2 and PP=2 (1F1B schedule) and fall
    for r in (tp2, pp2):
        assert r["losses"] == pytest.approx(tp1["losses"], abs=1e-5), (tp1["losses"], r["losses"])
    assert tp1["losses"][2] < tp1["losses"][0] - 0.5
    # the trained shards gathered back are a plain HF checkpoint with the same weights whatever the split (up to
    # float reduction order, which Adam's g / sqrt(v) amplifies on near-zero gradients: 8e-5 measured after 2 steps)
    exported = {name: AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}.hf").state_dict()
                for name in ("tp1", "tp2", "pp2")}
    for name in ("tp2", "pp2"):
        assert all(torch.allclose(exported[name][k], exported["tp1"][k], atol=5e-4) for k in exported["tp1"]), name


def same_export(a: Path, b: Path, atol: float = 5e-4) -> float:
    from transformers import AutoModelForCausalLM

    sa, sb = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b))
    diff = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert diff <= atol, diff
    return diff


@pytest.mark.parametrize("kind", ["qwen2_tied", "qwen3"])
def test_tp2_matches_hf_and_tp1_training_for_qkv_bias_tied_embeddings_and_qk_norm(models, tmp_path, kind):
    """Qwen3's q/k norms are one weight shared by every head, and a TP rank holds half the heads: each rank's
    gradient is a partial sum. Without summing it over TP (engine.finish_grads) the copies drift apart (measured:
    norm weights 0.039 off TP 1 after 2 steps, step-2 loss 2e-4 off)."""
    tp1 = run_worker(models[kind], tmp_path / "tp1.json", tp=1, procs=1)
    tp2 = run_worker(models[kind], tmp_path / "tp2.json", tp=2, procs=2)
    assert tp2["logits_max_abs_diff"] <= 1e-4 and tp2["hidden_max_abs_diff"] <= 1e-4 and tp2["roundtrip_exact"], tp2
    assert tp2["losses"] == pytest.approx(tp1["losses"], abs=1e-5), (tp1["losses"], tp2["losses"])
    same_export(tmp_path / "tp1.hf", tmp_path / "tp2.hf")


def test_sequence_parallel_pads_rows_and_trains_like_tp1(models, tmp_path):
    """Sequence parallelism at TP 2 on 15-token rows (padded to 16 to split over 2 ranks): logits and RM hidden
    states equal HF, training equals TP 1 (the norms' partial gradients summed over TP)."""
    tp1 = run_worker(models["llama"], tmp_path / "tp1.json", tp=1, procs=1, extra=("--seq", "15"))
    sp = run_worker(models["llama"], tmp_path / "sp.json", tp=2, procs=2, extra=("--sp", "--seq", "15"))
    assert sp["logits_max_abs_diff"] <= 1e-4 and sp["hidden_max_abs_diff"] <= 1e-4 and sp["roundtrip_exact"], sp
    assert sp["losses"] == pytest.approx(tp1["losses"], abs=1e-5), (tp1["losses"], sp["losses"])
    same_export(tmp_path / "tp1.hf", tmp_path / "sp.hf")


def test_lora_adapter_trains_alike_at_every_split_and_peft_reproduces_its_logits(models, tmp_path):
    """LoRA on the parallel linears: two steps give the same losses at TP 1, TP 2 and TP 2 with sequence
    parallelism (A's partial gradients summed over TP), and the adapter, gathered into peft's layout and loaded
    onto the HF model, gives Megatron's logits."""
    runs = {name: run_worker(models["llama"], tmp_path / f"{name}.json", tp=tp, procs=tp, extra=("--lora", *extra))
            for name, tp, extra in (("tp1", 1, ()), ("tp2", 2, ()), ("sp", 2, ("--sp",)))}
    for name, r in runs.items():
        assert r["lora_logits_max_abs_diff"] <= 1e-4 and r["lora_b_norm"] > 0.1, (name, r)
        assert r["lora_keys"] == r["peft_lora_keys"] == 2 * 7 * 2 and r["unexpected"] == 0, (name, r)
        assert r["losses"] == pytest.approx(runs["tp1"]["losses"], abs=1e-5), (name, r["losses"])
    assert runs["tp1"]["losses"][2] < runs["tp1"]["losses"][0] - 0.2
    assert runs["tp2"]["trainable"] < runs["tp1"]["trainable"]  # B of column / A of row linears are split


def test_unsupported_models_and_splits_are_one_line_errors(models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models["llama"])
    with pytest.raises(ConfigError, match="tensor_parallel=4 must divide the model's key/value heads \\(2\\)"):
        DecoderShape.from_hf(config).check_parallel(4, 1)
    with pytest.raises(ConfigError, match="pipeline_parallel=3 must divide the model's 2 layers"):
        DecoderShape.from_hf(config).check_parallel(1, 3)
    gpt2 = AutoConfig.for_model("gpt2")
    with pytest.raises(ConfigError, match="'gpt2'.*use engine=torch"):
        DecoderShape.from_hf(gpt2)
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ConfigError, match="not supported by engine=megatron"):
        rope_settings(config)
    config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_theta": 5e5}
    assert rope_settings(config) == {"rotary_base": 5e5, "rope_scaling": True, "rope_scaling_factor": 8.0}
