"""Steered generation (stage 3) on a tiny SFT model: attribute resolution, prompt ids, stop strings,
left-padded batching, seeded sampling, prompt files and the CLI's one-line errors.

The SFT model is the tiny random Llama after a few LoRA steps on 100 HelpSteer2 rows (steerable: the five
HelpSteer2 attributes, template hf = ChatML, stop string `<|im_end|>`), trained once per session.
Its outputs are gibberish; the tests check mechanics, never quality.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_recipe, tiny_sft_overrides
from steerlm.errors import ConfigError, DataError
from steerlm.steerable import SteerableModel, read_prompts_file

HS2_ATTRS = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
PROMPTS = ["What is DNS?", "Write a short poem about the sea, with rhymes, in three stanzas please.",
           {"system": "Be brief.", "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                             {"role": "user", "content": "Name a color."}]},
           "Why?"]


def train_tiny_sft(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny SFT model of this session (shared with test_evaluate): trained on first use."""
    run_dir = tmp_path_factory.getbasetemp() / "tiny_sft"
    if not (run_dir / "model" / "steerlm_sft.json").exists():
        run_recipe("train_sft", *tiny_sft_overrides(tiny_model_dir, run_dir))
    return run_dir / "model"


def with_card(model_dir: Path, dest: Path, **changes) -> Path:
    """A copy of the model dir whose card has `changes` applied (top-level keys; `format` is merged)."""
    shutil.copytree(model_dir, dest)
    card = json.loads((dest / "steerlm_sft.json").read_text())
    for k, v in changes.items():
        card[k] = {**card[k], **v} if isinstance(v, dict) else v
    (dest / "steerlm_sft.json").write_text(json.dumps(card))
    return dest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls on 2 busy cores: one thread is faster and steadier (the recipes run with OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return train_tiny_sft(tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def model(sft_dir) -> SteerableModel:
    return SteerableModel.load(str(sft_dir), device="cpu")


def decoded_prompt(m: SteerableModel, prompt, attributes=None) -> str:
    return m.tokenizer.decode(m.prompt_ids(prompt, attributes))


# ===== attributes ================================================================================
def test_defaults_come_from_the_card_and_overrides_change_the_prompt(model, sft_dir, tmp_path):
    card = json.loads((sft_dir / "steerlm_sft.json").read_text())
    assert model.steerable == HS2_ATTRS == card["steerable_attributes"]
    assert model.resolve_attributes() == card["default_attributes"] == model.resolve_attributes({"verbosity": None})
    assert model.resolve_attributes({"verbosity": 0, "humor": None}) == {**card["default_attributes"], "verbosity": 0.0}
    with pytest.raises(ConfigError, match="value 3.4 is not a level of the scale"):  # refused, never rounded
        model.resolve_attributes({"complexity": 3.4})
    assert model.resolve_attributes({"complexity": 3.0})["complexity"] == 3.0

    low, high = decoded_prompt(model, "What is DNS?", {"verbosity": 0}), decoded_prompt(model, "What is DNS?", {"verbosity": 4})
    assert low.endswith("<extra_id_2>helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:0\n")
    assert high.endswith("<extra_id_2>helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:4\n")
    assert model.prompt_ids("What is DNS?", {"verbosity": 0}) != model.prompt_ids("What is DNS?", {"verbosity": 4})
    # a different card default is what an unset attribute becomes
    other = SteerableModel.load(str(with_card(sft_dir, tmp_path / "m", default_attributes={
        **card["default_attributes"], "verbosity": 3.0, "helpfulness": 1.0})), device="cpu")
    assert "helpfulness:1,correctness:4,coherence:4,complexity:2,verbosity:3\n" in decoded_prompt(other, "What is DNS?")
    # multi-turn prompt with a system prompt: the earlier turns are rendered, the attributes go last
    text = decoded_prompt(model, PROMPTS[2])
    assert text.index("Be brief.") < text.index("Hello!") < text.index("Name a color.") < text.index("verbosity:2")


@pytest.mark.parametrize("overrides, words", [
    ({"helpfullness": 3}, ["unknown attribute 'helpfullness'", "steerable: helpfulness, correctness"]),
    ({"quality": 3}, ["'quality' is not steerable", "steerable: helpfulness, correctness"]),
    ({"verbosity": 5}, ["'verbosity'", "outside [0, 4]"]),
    ({"verbosity": -1}, ["'verbosity'", "outside"]),
    ({"verbosity": "high"}, ["'verbosity'", "not a number"]),
    ({"verbosity": True}, ["'verbosity'", "not a number"]),
])
def test_bad_attributes_are_config_errors(model, overrides, words):
    with pytest.raises(ConfigError) as e:
        model.generate(["hi"], overrides, max_new_tokens=2)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# ===== generation ================================================================================
def test_left_padded_batches_equal_one_by_one_generation(model):
    batched = model.generate(PROMPTS, max_new_tokens=24, batch_size=4)
    alone = [model.generate([p], max_new_tokens=24)[0] for p in PROMPTS]
    assert [(o["text"], o["tokens"]) for o in batched] == [(o["text"], o["tokens"]) for o in alone]
    assert len({o["text"] for o in batched}) > 1  # distinct outputs, so input order is really checked
    assert all(o["tokens"] == 24 and not o["stopped"] for o in batched)  # the random model never stops by itself
    assert model.generate(PROMPTS, max_new_tokens=24, batch_size=3) == batched  # greedy: deterministic


def test_sampling_is_deterministic_for_a_seed(model):
    a = model.generate(PROMPTS, max_new_tokens=16, do_sample=True, seed=7, top_k=50, top_p=0.95)
    b = model.generate(PROMPTS, max_new_tokens=16, do_sample=True, seed=7, top_k=50, top_p=0.95)
    c = model.generate(PROMPTS, max_new_tokens=16, do_sample=True, seed=8, top_k=50, top_p=0.95)
    assert a == b and [o["text"] for o in a] != [o["text"] for o in c]


def test_generation_stops_at_a_stop_string_and_removes_it(model, sft_dir, tmp_path):
    """Observe the greedy continuation, choose two of its tokens as the stop string, then check the cut."""
    import torch

    ids = model.prompt_ids("What is DNS?")
    with torch.inference_mode():
        out = model.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                   pad_token_id=model.tokenizer.pad_token_id)[0, len(ids):].tolist()
    decode = lambda t: model.tokenizer.decode(t, skip_special_tokens=False)
    full = decode(out)
    # a stop string of two ASCII tokens whose first occurrence in the text starts at token k
    k = next(k for k in range(6, 30) if decode(out[k:k + 2]).isascii() and decode(out[k:k + 2]).strip()
             and decode(out[:k]) + decode(out[k:k + 2]) == decode(out[:k + 2])
             and full.find(decode(out[k:k + 2])) == len(decode(out[:k])))
    stop, expected = decode(out[k:k + 2]), decode(out[:k])
    stopper = SteerableModel.load(str(with_card(sft_dir, tmp_path / "m", format={"stop_strings": [stop]})), device="cpu")
    assert stopper.stop_strings == [stop]
    (res,) = stopper.generate(["What is DNS?"], max_new_tokens=40)
    assert res["stopped"] and res["text"] == expected and stop not in res["text"]
    assert res["tokens"] == k
    assert stopper.stats.generated_tokens <= k + 2 < 40  # generation really stopped there
    # in a batch, with a longer prompt that does not stop, the short one is still cut at its stop string
    both = stopper.generate(["What is DNS?", PROMPTS[1]], max_new_tokens=40)
    assert both[0] == res


def test_nemo_output_is_cut_at_turn_start_eos_and_padding(sft_dir, tmp_path):
    m = SteerableModel.load(str(with_card(sft_dir, tmp_path / "m", format={"template": "nemo"})), device="cpu")
    assert m.stop_strings == ["<extra_id_1>"]
    assert decoded_prompt(m, "What is DNS?").endswith("<extra_id_1>Assistant\n<extra_id_2>helpfulness:4,"
                                                      "correctness:4,coherence:4,complexity:2,verbosity:2\n")
    enc = lambda s: m.tokenizer(s, add_special_tokens=False)["input_ids"]
    pad, eos = m.tokenizer.pad_token_id, m.tokenizer.eos_token_id
    reply = enc("Blue is a color")
    cut = m.finish_text(reply + enc("\n<extra_id_1>User\nok") + [pad] * 3)
    ids = cut.pop("ids")  # the sampled ids end with the stop string: what a PPO update trains on
    assert cut == {"text": "Blue is a color", "tokens": len(enc("Blue is a color\n")), "stopped": True}
    assert m.tokenizer.decode(ids).endswith("<extra_id_1>") and ids[:len(reply)] == reply
    assert m.finish_text(reply + [eos] + [pad] * 2) == {"text": "Blue is a color", "tokens": len(reply), "stopped": True,
                                                 "ids": reply + [eos]}
    assert m.finish_text(reply) == {"text": "Blue is a color", "tokens": len(reply), "stopped": False, "ids": reply}


# ===== prompt files and the CLI ==================================================================
def test_prompt_files(model, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("What is DNS?\n\nWhy?\n")
    assert read_prompts_file(str(txt), model.schema) == ["What is DNS?", "Why?"]
    good = [{"prompt": "What is DNS?"}, {"system": "Be brief.", "turns": [{"role": "user", "content": "Hi"}]}]
    bad = {"turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    for rows, line, field in [(good + [bad], 3, "turns"), (good + [{"prompt": 3}], 3, "prompt"),
                              ([{"text": "x"}] + good, 1, "prompt"), (good + [{"system": 1, "turns": []}], 3, "system")]:
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError) as e:
            read_prompts_file(str(path), model.schema)
        assert (e.value.source, e.value.line, e.value.field) == (str(path), line, field), str(e.value)
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"prompt": "torn\n')
    with pytest.raises(DataError, match=r"p\.jsonl:3: malformed JSON"):
        read_prompts_file(str(path), model.schema)


def test_cli_writes_jsonl_and_bad_attributes_exit_2_with_one_line(sft_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is DNS?"}) + "\n" + json.dumps(PROMPTS[2]) + "\n")
    out = tmp_path / "out" / "gen.jsonl"
    common = [f"model.path={sft_dir}", "generation.max_new_tokens=8"]
    runs = {"ok": [f"prompts_file={prompts}", f"output={out}", "attributes.verbosity=0", "attributes.complexity=4"],
            "not_steerable": ["prompt=hi", "attributes.quality=3"],
            "out_of_range": ["prompt=hi", "attributes.verbosity=9"],
            "unknown": ["prompt=hi", "+attributes.helpfullness=3"]}
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(runs, pool.map(lambda ov: run_recipe("generate", *common, *ov, check=False), runs.values())))
    ok = procs["ok"]
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["turns"][-1]["content"] for r in rows] == ["What is DNS?", "Name a color."]
    assert all(r["attributes"]["verbosity"] == 0 and r["attributes"]["complexity"] == 4 and r["tokens"] == 8 for r in rows)
    assert rows[0]["label"] == "helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:0"
    assert ok.stdout.count("=== ") == 2 and rows[1]["response"] in ok.stdout
    assert not list(out.parent.glob("*.tmp"))
    for name, words in [("not_steerable", ["'quality' is not steerable", "helpfulness"]),
                        ("out_of_range", ["'verbosity'", "outside [0, 4]"]), ("unknown", ["'helpfullness'"])]:
        p = procs[name]
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert lines[-1].startswith("steerlm: error: ") and all(w in lines[-1] for w in words), lines[-1]


# ===== the continuous-batching loop (steerlm.generation) =========================================
# 11 prompts of several lengths, with repeats (greedy decodes them once) and shared prefixes (prefilled once)
MANY = PROMPTS + PROMPTS[:2] + [f"Question {k}: {PROMPTS[1]}" for k in range(3)] + ["Why? " * 6, "Name a color."]


@pytest.fixture
def loop(model):
    """The fixture model with a small live batch (rows leave and waiting prompts join), restored after."""
    saved = model.backend, model.max_rows, model.eos_ids
    model.max_rows = 3
    yield model
    model.backend, model.max_rows, model.eos_ids = saved


def hf(m: SteerableModel, *args, **kw) -> list[dict]:
    backend, m.backend = m.backend, "hf_generate"
    try:
        return m.generate(*args, **kw)
    finally:
        m.backend = backend


def common_token(m: SteerableModel, prompts, n: int) -> int:
    """A token the greedy answers first generate at the most different steps: as an extra eos, rows stop at
    different times (the random tiny model never stops by itself)."""
    firsts: dict[int, set] = {}
    for o in hf(m, prompts, max_new_tokens=n, progress=False):
        for k, t in enumerate(o["ids"]):
            if k and t not in o["ids"][:k]:
                firsts.setdefault(t, set()).add(k)
    return max(firsts, key=lambda t: len(firsts[t]))


def test_continuous_batching_equals_hf_generate_and_one_by_one(loop, monkeypatch):
    from steerlm import generation

    loop.eos_ids = sorted({*loop.eos_ids, common_token(loop, MANY, 20)})
    ref = hf(loop, MANY, max_new_tokens=20, batch_size=4, progress=False)
    assert 1 < sum(o["stopped"] for o in ref) < len(MANY)  # rows stop at different steps, some run out
    assert len({o["tokens"] for o in ref}) > 2
    chunked = []
    plain = generation.rows_sdpa_attention
    monkeypatch.setattr(generation, "rows_sdpa_attention",
                        lambda *a, **kw: chunked.append(len(kw.get("steerlm_chunks") or [])) or plain(*a, **kw))
    got = loop.generate(MANY, max_new_tokens=20, batch_size=1, progress=False)
    assert got == ref  # text, tokens, stopped, ids, attributes
    assert max(chunked) > 1  # rows of different lengths attended per chunk
    assert loop.model.config._attn_implementation == "sdpa"  # restored
    alone = [loop.generate([p], max_new_tokens=20, progress=False)[0] for p in MANY[:5]]
    assert alone == got[:5]
    generated = loop.stats.generated_tokens
    loop.generate(MANY, max_new_tokens=20, batch_size=1, progress=False)
    assert loop.stats.generated_tokens - generated == sum(len(o["ids"]) for o in got)  # stop tokens counted


def test_max_new_tokens_is_respected(loop):
    for n in (1, 2, 7):
        outs = loop.generate(MANY, max_new_tokens=n, batch_size=1, progress=False)
        assert all(len(o["ids"]) <= n and o["tokens"] <= n for o in outs)
        assert all(len(o["ids"]) == n for o in outs if not o["stopped"])
        assert outs == hf(loop, MANY, max_new_tokens=n, progress=False)


def test_mixed_attributes_and_steering_per_row_equal_separate_calls(loop):
    import torch

    from steerlm.steering import Ablation, Add, SteeringSpec

    H = loop.model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    specs = [SteeringSpec.add(0, torch.randn(H, generator=g), 6.0, positions="generated"),
             SteeringSpec.add(1, torch.randn(H, generator=g), -5.0, positions="all"),
             SteeringSpec({0: [Ablation(torch.randn(H, generator=g), 0.0)],
                           1: [Add(torch.randn(H, generator=g), 4.0)]}, positions="prompt"), None]
    prompts = MANY[:8]
    attrs = [{"verbosity": k % 5, "complexity": (k * 2) % 5} for k in range(8)]
    steering = [specs[k % 4] for k in range(8)]
    together = loop.generate(prompts, attrs, max_new_tokens=12, batch_size=1, steering=steering, progress=False)
    separate = [loop.generate([p], a, max_new_tokens=12, steering=s, progress=False)[0]
                for p, a, s in zip(prompts, attrs, steering)]
    assert together == separate == hf(loop, prompts, attrs, max_new_tokens=12, steering=steering, progress=False)
    plain = loop.generate(prompts, attrs, max_new_tokens=12, batch_size=1, progress=False)
    assert [o["text"] for o in plain][3::4] == [o["text"] for o in together][3::4]  # unsteered rows
    assert all(p["text"] != t["text"] for p, t, s in zip(plain, together, steering) if s is not None)  # steered rows
    # one spec for every row, steering only the generated tokens
    one = loop.generate(prompts, max_new_tokens=12, batch_size=1, steering=specs[0], progress=False)
    assert one == [loop.generate([p], max_new_tokens=12, steering=specs[0], progress=False)[0] for p in prompts]


def test_sampling_is_deterministic_for_a_seed_and_batch_independent(loop):
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, progress=False)
    a = loop.generate(MANY, seed=7, batch_size=1, **kw)
    assert loop.generate(MANY, seed=7, batch_size=1, **kw) == a
    loop.max_rows = 11
    assert loop.generate(MANY, seed=7, **kw) == a  # per-prompt streams: the batch does not change the draws
    assert [o["text"] for o in loop.generate(MANY, seed=8, **kw)] != [o["text"] for o in a]
    # a repeated prompt gets its own draws; greedy is not what sampling picks
    assert MANY[4] == MANY[0] and a[4]["text"] != a[0]["text"]
    assert [o["text"] for o in a] != [o["text"] for o in loop.generate(MANY, max_new_tokens=16, progress=False)]


def test_top_k_1_sampling_is_greedy(loop):
    greedy = loop.generate(MANY, max_new_tokens=10, progress=False)
    assert loop.generate(MANY, max_new_tokens=10, do_sample=True, top_k=1, seed=5, progress=False) == greedy
    assert loop.generate(MANY, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=5, progress=False) == greedy


def test_stop_strings_that_are_not_tokens_cut_rows_in_a_batch(sft_dir, tmp_path):
    """A two-token stop string met at different steps by different prompts: equal to HF generate's cut."""
    m = SteerableModel.load(str(sft_dir), device="cpu")
    prompts = [p for p in MANY if isinstance(p, str)]  # a stop string must also close the template's past turns
    outs = hf(m, prompts, max_new_tokens=30, progress=False)
    decode = lambda t: m.tokenizer.decode(t, skip_special_tokens=False)
    counts = {}
    for j, o in enumerate(outs):
        for k in range(2, len(o["ids"]) - 1):
            s = decode(o["ids"][k:k + 2])
            if s.isascii() and s.strip() and decode(o["ids"][:k + 2]).endswith(s):
                counts.setdefault(s, set()).add((str(prompts[j]), k))
    stop = max(counts, key=lambda s: (len({p for p, _ in counts[s]}), len(counts[s])))  # in the most answers
    stopper = SteerableModel.load(str(with_card(sft_dir, tmp_path / "m", format={"stop_strings": [stop]})), device="cpu")
    assert stopper.hf_stop_strings == [stop]
    stopper.max_rows = 3
    got = stopper.generate(prompts, max_new_tokens=30, batch_size=1, progress=False)
    ref = hf(stopper, prompts, max_new_tokens=30, batch_size=4, progress=False)
    assert [(o["text"], o["tokens"], o["stopped"]) for o in got] == [(o["text"], o["tokens"], o["stopped"]) for o in ref]
    assert sum(o["stopped"] for o in got) >= 2 and all(stop not in o["text"] for o in got)
    assert all(stop in decode(o["ids"]) and stop not in decode(o["ids"][:-1]) for o in got if o["stopped"])


def test_models_the_loop_cannot_reproduce_use_hf_generate(loop):
    from steerlm.generation import unsupported

    assert unsupported(loop.model, do_sample=False) is None
    gc = loop.model.generation_config
    gc.repetition_penalty = 1.3
    try:
        assert "repetition_penalty" in unsupported(loop.model, do_sample=False)
        assert loop.generate(MANY[:4], max_new_tokens=12, progress=False) == hf(loop, MANY[:4], max_new_tokens=12,
                                                                               progress=False)
    finally:
        gc.repetition_penalty = 1.0


def test_prefix_families_and_row_chunks():
    from steerlm.generation import chunk_rows
    from steerlm.generation_prefill import families

    system, a, b = [1] * 30, [2] * 12, [4] * 12
    seqs = [system + a + [3, k] + [5] * 20 for k in range(4)] + [system + b + [3, k] for k in range(3)] + [[9] * 40]
    assert families(seqs, [None] * 8) == [([0, 1, 2, 3], 43), ([4, 5, 6], 43), ([7], None)]
    assert families(seqs[:2], [None, "other spec"]) == [([0], None), ([1], None)]  # different steering: no sharing
    assert families([[7] * 20, [7] * 20], [None, None]) == [([0, 1], 19)]  # duplicates: all but the last token
    assert chunk_rows([99, 98, 97, 40, 39, 10]) == [(0, 3, 100, True), (3, 5, 41, True), (5, 6, 11, False)]
    assert chunk_rows([5, 5]) == [(0, 2, 6, False)]
