"""AC-SFT rendering and the loss mask, token by token, for both templates and multi-turn conversations."""

from __future__ import annotations

import pytest

from steerlm.attributes import get_schema
from steerlm.errors import ConfigError
from steerlm.models.reward_model import load_tokenizer
from steerlm.sft_template import SFTFormat, encode_conversation, prompt_ids
from steerlm.templates import NEMO_SYSTEM_PROMPT

SCHEMA = get_schema("steerlm9")
TURNS = [
    {"role": "user", "content": "Why is the sky blue?", "labels": None},
    {"role": "assistant", "content": "Rayleigh scattering.", "labels": {"quality": 3.6, "humor": 0.2, "verbosity": 1}},
    {"role": "user", "content": "Say more, please.", "labels": None},
    {"role": "assistant", "content": "Short wavelengths scatter more off air molecules.", "labels": {"quality": 4}},
]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request, tiny_model_dir):
    # tiny: <extra_id_*> are special tokens; smollm2: a real tokenizer where they are plain text
    return load_tokenizer(str(tiny_model_dir) if request.param == "tiny" else "embedded:smollm2-135m-instruct")


def trained_runs(tokenizer, ids, mask) -> tuple[list[str], list[str]]:
    """Decode maximal runs of trained and of masked tokens."""
    runs = {True: [], False: []}
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs[mask[start]].append(tokenizer.decode(ids[start:i]))
            start = i
    return runs[True], runs[False]


def test_nemo_exact_string_and_mask(tokenizer):
    ids, mask = encode_conversation(SFTFormat("nemo"), tokenizer, SCHEMA, None, TURNS)
    assert tokenizer.decode(ids) == (
        f"<extra_id_0>System\n{NEMO_SYSTEM_PROMPT}\n"
        "<extra_id_1>User\nWhy is the sky blue?\n"
        "<extra_id_1>Assistant\n<extra_id_2>quality:4,humor:0,verbosity:1\nRayleigh scattering.\n"
        "<extra_id_1>User\nSay more, please.\n"
        "<extra_id_1>Assistant\n<extra_id_2>quality:4\nShort wavelengths scatter more off air molecules.\n"
        "<extra_id_1>")
    trained, masked = trained_runs(tokenizer, ids, mask)
    # trained: each response, its end of turn, and the next <extra_id_1> (the stop string) — nothing else
    assert trained == ["Rayleigh scattering.\n<extra_id_1>",
                       "Short wavelengths scatter more off air molecules.\n<extra_id_1>"]
    assert len(masked) == 2 and masked[0].endswith(
        "Why is the sky blue?\n<extra_id_1>Assistant\n<extra_id_2>quality:4,humor:0,verbosity:1\n")
    assert masked[1] == "User\nSay more, please.\n<extra_id_1>Assistant\n<extra_id_2>quality:4\n"


def test_hf_template_mask(tokenizer):
    ids, mask = encode_conversation(SFTFormat("hf"), tokenizer, SCHEMA, "Be brief.", TURNS)
    text = tokenizer.decode(ids)
    trained, masked = trained_runs(tokenizer, ids, mask)
    eot = tokenizer.eos_token
    assert trained == [f"Rayleigh scattering.{eot}", f"Short wavelengths scatter more off air molecules.{eot}"]
    assert "Be brief." in masked[0] and "Why is the sky blue?" in masked[0]
    # the attribute segment sits right after the assistant header and is masked
    assert masked[0].endswith("assistant\n<extra_id_2>quality:4,humor:0,verbosity:1\n")
    assert masked[1].rstrip().endswith("assistant\n<extra_id_2>quality:4")
    assert text.count("<extra_id_2>") == 2


@pytest.mark.parametrize("template", ["nemo", "hf"])
def test_inference_prompt_is_the_training_prefix(tokenizer, template):
    fmt = SFTFormat(template)
    ids, mask = encode_conversation(fmt, tokenizer, SCHEMA, None, TURNS)
    p = prompt_ids(fmt, tokenizer, SCHEMA, None, TURNS[:3], {"quality": 4})
    assert ids[:len(p)] == p
    assert mask[len(p)] and not any(mask[len(p) - 10:len(p)])  # generation starts at the first trained token


def test_unlabeled_turn_has_no_attribute_segment(tokenizer):
    turns = [dict(t, labels=None) for t in TURNS]
    for template in ("nemo", "hf"):
        ids, _ = encode_conversation(SFTFormat(template), tokenizer, SCHEMA, None, turns)
        assert "<extra_id_2>" not in tokenizer.decode(ids)


def test_missing_attributes_are_omitted_and_values_rounded():
    assert SCHEMA.format_label({"verbosity": 0.4, "quality": 3.5}) == "quality:4,verbosity:0"


def test_hf_template_needs_a_chat_template(tokenizer):
    tok = load_tokenizer(tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat_template"):
        encode_conversation(SFTFormat("hf"), tok, SCHEMA, None, TURNS)


def test_hf_template_without_the_stop_string_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="stop_strings"):
        encode_conversation(SFTFormat("hf", stop_strings=("<never>",)), tokenizer, SCHEMA, None, TURNS)
