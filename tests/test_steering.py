"""Activation steering: op math on known vectors, hooks on a real (tiny) HF model, per-row specs, capture, IO."""

from __future__ import annotations

import pytest
import torch

from steerlm.errors import ConfigError
from steerlm.steering import Ablation, Add, LayerSpec, ProjectionCap, SteeringSpec, steer


# ===== op math ===================================================================================
def test_ops_on_known_vectors():
    h = torch.tensor([[3.0, 4.0, 1.0], [-2.0, 0.5, 0.0]])
    e0 = torch.tensor([2.0, 0.0, 0.0])  # not unit: the ops normalise it
    assert torch.equal(Add(e0, 1.5).apply(h), h + torch.tensor([1.5, 0.0, 0.0]))
    assert torch.allclose(Add.from_unnormalized(e0, 0.5).apply(h), h + 0.5 * e0)
    capped = ProjectionCap(e0, min=-1.0, max=2.0).apply(h)
    assert torch.equal(capped, torch.tensor([[2.0, 4.0, 1.0], [-1.0, 0.5, 0.0]]))  # only the e0 component moves
    assert torch.equal(Ablation(e0, 0.0).apply(h), torch.tensor([[0.0, 4.0, 1.0], [0.0, 0.5, 0.0]]))
    assert torch.equal(Ablation(e0, 2.0).apply(h), torch.tensor([[6.0, 4.0, 1.0], [-4.0, 0.5, 0.0]]))
    # a diagonal direction: ablation leaves h orthogonal to it; the cap bounds the projection
    d = torch.tensor([1.0, 1.0, 0.0])
    u = d / d.norm()
    assert torch.allclose(Ablation(d).apply(h) @ u, torch.zeros(2), atol=1e-6)
    assert float((ProjectionCap(d, max=1.0).apply(h) @ u).max()) == pytest.approx(1.0)
    # ops compose in order: ablate, then add
    both = LayerSpec([Ablation(e0), Add(e0, 5.0)]).apply(h)
    assert torch.equal(both[:, 0], torch.tensor([5.0, 5.0])) and torch.equal(both[:, 1:], h[:, 1:])


def test_bad_ops_are_config_errors():
    with pytest.raises(ConfigError, match="non-zero"):
        Add(torch.zeros(4), 1.0)
    with pytest.raises(ConfigError, match="finite"):
        Ablation(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ConfigError, match="min, max or both"):
        ProjectionCap(torch.ones(3))
    with pytest.raises(ConfigError, match="positions"):
        SteeringSpec({}, positions="middle")


def test_spec_save_load_round_trip(tmp_path):
    spec = SteeringSpec({1: [Add(torch.randn(8), 2.0), ProjectionCap(torch.randn(8), min=-1.0)],
                         0: [Ablation(torch.randn(8), 0.5)]}, positions="generated")
    spec.save(tmp_path / "s")
    back = SteeringSpec.load(tmp_path / "s")
    assert back.positions == "generated" and sorted(back.layers) == [0, 1]
    h = torch.randn(5, 8)
    for i in (0, 1):
        assert torch.equal(back.layers[i].apply(h), spec.layers[i].apply(h))
    with pytest.raises(FileNotFoundError, match="not a steering spec"):
        SteeringSpec.load(tmp_path)


# ===== hooks on a real model =====================================================================
@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def batch(lm, rows=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.config.vocab_size, (rows, T), generator=g)


def logits(lm, ids, **steer_kw):
    with torch.no_grad(), steer(lm, batch_size=ids.shape[0], **steer_kw):
        return lm(input_ids=ids).logits


def test_zero_spec_is_bit_identical_and_hooks_are_removed(lm):
    ids = batch(lm)
    plain = lm(input_ids=ids).logits.detach()
    H = lm.config.hidden_size
    zero = SteeringSpec({0: [Add(torch.randn(H), 0.0), Ablation(torch.randn(H), 1.0)], 1: [Add(torch.randn(H), 0.0)]})
    assert torch.equal(logits(lm, ids, specs=zero), plain)
    assert torch.equal(logits(lm, ids, specs=None, capture_layers=[0, 1]), plain)  # capture alone changes nothing
    moved = logits(lm, ids, specs=SteeringSpec.add(0, torch.randn(H), 4.0))
    assert not torch.allclose(moved, plain)
    # every hook is gone after the context, also after an exception inside it
    assert torch.equal(lm(input_ids=ids).logits.detach(), plain)
    with pytest.raises(RuntimeError), steer(lm, SteeringSpec.add(0, torch.randn(H), 4.0)):
        raise RuntimeError("boom")
    hooks = [m for m in lm.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == [] and torch.equal(lm(input_ids=ids).logits.detach(), plain)


def test_per_row_specs_in_one_batch_equal_rows_run_separately(lm):
    ids = batch(lm, rows=3)
    H = lm.config.hidden_size
    a, b = SteeringSpec.add(1, torch.randn(H), 3.0), SteeringSpec({0: [Ablation(torch.randn(H), 0.0)]})
    together = logits(lm, ids, specs=[a, None, b])
    for r, spec in enumerate([a, None, b]):
        alone = logits(lm, ids[r:r + 1], specs=[spec])
        assert torch.allclose(together[r], alone[0], atol=1e-5), r
    with pytest.raises(ConfigError, match="2 steering specs for a batch of 3"):
        logits(lm, ids, specs=[a, b])


def test_positions_prompt_and_generated_split_the_sequence(lm):
    ids = batch(lm, rows=2, T=8)
    H = lm.config.hidden_size
    v = torch.randn(H)
    plain = lm(input_ids=ids).logits.detach()
    lens = [3, 5]
    prompt_only = logits(lm, ids, specs=SteeringSpec.add(0, v, 4.0, positions="prompt"), prompt_lengths=lens)
    gen_only = logits(lm, ids, specs=SteeringSpec.add(0, v, 4.0, positions="generated"), prompt_lengths=lens)
    for r, n in enumerate(lens):
        # causal: steering only later positions leaves the earlier ones exactly as they were
        assert torch.equal(gen_only[r, :n], plain[r, :n]) and not torch.allclose(gen_only[r, n:], plain[r, n:])
        assert not torch.allclose(prompt_only[r, :n], plain[r, :n])
    with pytest.raises(ConfigError, match="needs the prompt lengths"):
        logits(lm, ids, specs=SteeringSpec.add(0, v, 4.0, positions="prompt"))


def test_capture_matches_hidden_states_and_counts_cached_positions(lm):
    ids = batch(lm, rows=2, T=6)
    with torch.no_grad():
        ref = lm(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0, layer 1, ...]
        with steer(lm, capture_layers=[0]) as cap:
            lm(input_ids=ids)
    assert torch.allclose(cap[0], ref[1], atol=1e-6)
    # generation: one prefill call plus cached one-token calls; "generated" steering starts at the prompt width
    H = lm.config.hidden_size
    spec = SteeringSpec.add(0, torch.randn(H), 6.0, positions="generated")
    with torch.no_grad(), steer(lm, spec, prompt_lengths=[6, 6], capture_layers=[0]) as cap:
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                          pad_token_id=0)
    plain = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                        pad_token_id=0)
    assert cap[0].shape[:2] == (2, 6 + 3)  # positions of the prompt and of the 3 fed-back generated tokens
    assert torch.equal(out[:, :7], plain[:, :7])  # the first new token comes from the (unsteered) prompt
    with pytest.raises(KeyError):
        cap[1]


# ===== steered generation and attribute vectors on the tiny SFT model ============================
@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory):
    from steerlm.steerable import SteerableModel
    from test_generate import train_tiny_sft

    path = train_tiny_sft(tiny_model_dir, tmp_path_factory)
    policy = SteerableModel.load(str(path), device="cpu")
    policy.card_path = path
    return policy


PROMPTS = ["What is DNS?", "Write a poem about the sea.", "Why?"]


def test_generate_with_per_row_specs_equals_one_by_one(policy):
    H = policy.model.config.hidden_size
    zero = SteeringSpec.add(1, torch.randn(H), 0.0)
    plain = policy.generate(PROMPTS, max_new_tokens=10, progress=False)
    strip = lambda outs: [(o["text"], o["ids"]) for o in outs]
    assert strip(policy.generate(PROMPTS, max_new_tokens=10, steering=zero)) == strip(plain)
    push = SteeringSpec.add(1, torch.randn(H, generator=torch.Generator().manual_seed(1)), 30.0)
    mixed = policy.generate(PROMPTS, max_new_tokens=10, steering=[push, None, push], batch_size=3)
    alone = [policy.generate([p], max_new_tokens=10, steering=[s])[0] for p, s in zip(PROMPTS, [push, None, push])]
    assert strip(mixed) == strip(alone)
    assert mixed[1]["text"] == plain[1]["text"] and mixed[0]["text"] != plain[0]["text"]
    with pytest.raises(ConfigError, match="2 steering specs for 3 prompts"):
        policy.generate(PROMPTS, steering=[push, None])


def write_labeled(path, n=24):
    import json

    rows = []
    for k in range(n):
        words = " ".join(["word"] * (1 + 3 * k))  # longer responses get higher verbosity scores
        rows.append({"id": f"c{k}", "system": None, "turns": [
            {"role": "user", "content": f"question {k}?", "labels": None},
            {"role": "assistant", "content": words, "labels": {"verbosity": float(k % 5)},
             "scores": {"verbosity": k / n * 4}}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_attribute_vectors_are_the_high_minus_low_mean_response_activation(policy, tmp_path):
    from steerlm.stages.steerlm2_data import encode_response
    from steerlm.steering.vectors import AttributeVectors, build_attribute_vectors, scored_turns

    labeled = write_labeled(tmp_path / "labeled.jsonl")
    vecs = build_attribute_vectors(policy.model, policy.tokenizer, policy.format, policy.schema, str(labeled),
                                   ["verbosity"], [0, 1], fraction=0.25)
    meta = vecs.meta["attributes"]["verbosity"]
    assert meta["high"] == meta["low"] == 6 and meta["high_score_range"][0] > meta["low_score_range"][1]
    # by hand for layer 0: the 6 highest scored turns minus the 6 lowest, each a mean over response tokens
    turns = sorted(scored_turns(str(labeled), policy.schema, "verbosity"), key=lambda t: t["score"])

    def mean_act(t):
        ids, mask = encode_response(policy.format, policy.tokenizer, policy.schema,
                                    {"system": None, "turns": t["turns"], "attributes": None}, t["response"], False)
        with torch.no_grad():
            hs = policy.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        return hs[torch.tensor(mask)].mean(0)

    want = torch.stack([mean_act(t) for t in turns[-6:]]).mean(0) - torch.stack([mean_act(t) for t in turns[:6]]).mean(0)
    assert torch.allclose(vecs.vectors["verbosity"][0], want, atol=1e-4)
    vecs.save(tmp_path / "v")
    back = AttributeVectors.load(tmp_path / "v")
    assert torch.equal(back.vectors["verbosity"][1], vecs.vectors["verbosity"][1])
    spec = back.spec("verbosity", 1, 2.0)
    assert spec.layers[1].ops[0].scale == pytest.approx(2.0 * float(vecs.vectors["verbosity"][1].norm()))
    assert back.spec("verbosity", 1, 0.0).is_noop()
    with pytest.raises(ConfigError, match="no verbosity vector at layer 5"):
        back.spec("verbosity", 5, 1.0)


def test_vector_input_errors_name_file_line_and_attribute(policy, tmp_path):
    from steerlm.errors import DataError
    from steerlm.steering.vectors import build_attribute_vectors

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": []}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'turns'"):
        build_attribute_vectors(policy.model, policy.tokenizer, policy.format, policy.schema, str(bad), ["verbosity"], [0])
    few = write_labeled(tmp_path / "few.jsonl", n=6)
    with pytest.raises(ConfigError, match="too few"):
        build_attribute_vectors(policy.model, policy.tokenizer, policy.format, policy.schema, str(few), ["verbosity"], [0])
    with pytest.raises(ConfigError, match="not in schema"):
        build_attribute_vectors(policy.model, policy.tokenizer, policy.format, policy.schema, str(few), ["verbose"], [0])


# ===== the recipes: build vectors, then one comparison table =====================================
def test_build_vectors_and_compare_through_the_cli(policy, tiny_model_dir, tmp_path):
    import json

    from conftest import HS2_SAMPLE, run_recipe, tiny_reward_overrides

    sft = policy.card_path
    rm = tmp_path / "rm"
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, rm, f"data.train=[{{format: helpsteer2, path: {HS2_SAMPLE}}}]"))
    labeled = write_labeled(tmp_path / "labeled.jsonl", n=32)
    run_recipe("build_steering_vectors", f"policy={sft}", f"labeled={labeled}", f"output_dir={tmp_path / 'v'}",
               "layers=[0,1]", "device=cpu")
    meta = json.loads((tmp_path / "v" / "steering_vectors.json").read_text())
    assert meta["layers"] == [0, 1] and meta["attributes"]["verbosity"]["high"] == 8
    common = [f"policy={sft}", f"rm={rm / 'model'}", f"vectors={tmp_path / 'v'}", "layer=1", "n_prompts=2",
              "levels=[0,4]", "coefficients=[-8,8]", "generation.max_new_tokens=6", "utility.n_references=3",
              "utility.batch_size=2", "device=cpu"]
    run_recipe("compare_steering", *common, f"output_dir={tmp_path / 'c'}")
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert set(result["methods"]) == {"ac_sft", "activation", "both"} and result["layer"] == 1
    act, ac = result["methods"]["activation"], result["methods"]["ac_sft"]
    assert act["levels"] == [-8.0, 8.0] and act["n"] == 4 and ac["levels"] == [0, 4]
    base = result["utility"]["unsteered_perplexity"]
    assert result["utility"]["references"] == 3 and base > 1
    assert all(p != pytest.approx(base, rel=1e-6) for p in act["perplexity"])  # the vector really moved the model
    samples = [json.loads(x) for x in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 * 2 and (tmp_path / "c" / "compare.png").stat().st_size > 1000
    proc = run_recipe("compare_steering", *common, "coefficients=[-8,0,8]", f"output_dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode == 2 and "pairs levels and coefficients by index" in proc.stderr

    # generate and evaluate take the same steering block
    gen = [f"model.path={sft}", "prompt=What is DNS?", "generation.max_new_tokens=8", "device=cpu"]
    texts = {}
    for name, extra in {"plain": [], "zero": [f"steering.vectors={tmp_path / 'v'}", "steering.attribute=verbosity",
                                              "steering.coefficient=0"],
                        "push": [f"steering.vectors={tmp_path / 'v'}", "steering.attribute=verbosity",
                                 "steering.coefficient=40", "steering.layer=1"]}.items():
        run_recipe("generate", *gen, *extra, f"output={tmp_path / name}.jsonl")
        texts[name] = json.loads((tmp_path / f"{name}.jsonl").read_text())["response"]
    assert texts["zero"] == texts["plain"] != texts["push"]
    proc = run_recipe("generate", *gen, f"steering.vectors={tmp_path / 'v'}", check=False)
    assert proc.returncode == 2 and "needs steering.attribute" in proc.stderr
    run_recipe("evaluate", f"model.path={sft}", f"rm={rm / 'model'}", f"output_dir={tmp_path / 'e'}", "n_prompts=2",
               "attributes=[verbosity]", "levels=[0,4]", "generation.max_new_tokens=6", "device=cpu",
               f"steering.vectors={tmp_path / 'v'}", "steering.attribute=verbosity", "steering.coefficient=3")
    steered = json.loads((tmp_path / "e" / "steerability.json").read_text())["steering"]
    assert steered["positions"] == "all" and steered["layers"]["1"][0]["type"] == "add"  # layer null: the middle one


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gemma2"])
def test_hooks_on_other_decoder_families(family):
    """The hooks find and steer the decoder layers of each family the issue names (tiny random configs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(logits(model, ids, specs=SteeringSpec.add(1, torch.randn(32), 0.0)), plain.logits)
        with steer(model, capture_layers=[0]) as cap:
            model(input_ids=ids)
        assert torch.allclose(cap[0], plain.hidden_states[1], atol=1e-5)
        moved = logits(model, ids, specs=[SteeringSpec.add(0, torch.randn(32), 8.0), None])
    assert not torch.allclose(moved[0], plain.logits[0]) and torch.allclose(moved[1], plain.logits[1], atol=1e-6)
