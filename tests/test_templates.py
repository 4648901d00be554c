"""RM input rendering: NeMo-Aligner's exact string, the tokenizer's chat template, and tokenization."""

from __future__ import annotations

import pytest

from steerlm.data.nemo import render_nemo_text
from steerlm.templates import NEMO_SYSTEM_PROMPT, render_rm_input, tokenize_rm_input

NEMO_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def user(text):
    return {"role": "user", "content": text, "labels": None}


def assistant(text, labels=None):
    return {"role": "assistant", "content": text, "labels": labels}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_default_system_prompt_is_nemos():
    assert NEMO_SYSTEM_PROMPT == NEMO_SYSTEM


def test_nemo_one_turn_exact_string():
    text = render_rm_input("nemo", None, "Be brief.", [user("Why is the sky blue?"),
                                                       assistant("Rayleigh scattering.", {"helpfulness": 4})])
    assert text == ("<extra_id_0>System\nBe brief.\n"
                    "<extra_id_1>User\nWhy is the sky blue?\n"
                    "<extra_id_1>Assistant\nRayleigh scattering.\n"
                    "<extra_id_2>")


def test_nemo_default_system_prompt_when_system_is_none():
    text = render_rm_input("nemo", None, None, [user("hi"), assistant("hello")])
    assert text == f"<extra_id_0>System\n{NEMO_SYSTEM}\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\nhello\n<extra_id_2>"
    # an empty system prompt is kept as given, not replaced by the default
    assert render_rm_input("nemo", None, "", [user("hi"), assistant("hello")]).startswith(
        "<extra_id_0>System\n\n<extra_id_1>User\n")


def test_nemo_multi_turn_has_no_labels_on_earlier_turns():
    """process_to_regression_format: earlier assistant turns are plain text, one <extra_id_2> at the end."""
    turns = [user("Name a color."), assistant("Blue.", {"quality": 4, "humor": 0}),
             user("Another one?"), assistant("Red, a warm\ncolor.", {"helpfulness": 3})]
    text = render_rm_input("nemo", None, None, turns)
    assert text == (f"<extra_id_0>System\n{NEMO_SYSTEM}\n"
                    "<extra_id_1>User\nName a color.\n"
                    "<extra_id_1>Assistant\nBlue.\n"
                    "<extra_id_1>User\nAnother one?\n"
                    "<extra_id_1>Assistant\nRed, a warm\ncolor.\n"
                    "<extra_id_2>")
    assert text.count("<extra_id_2>") == 1 and "quality" not in text and "helpfulness" not in text
    # the NeMo file exporter renders the same text
    assert text == render_nemo_text(None, turns)


def test_hf_mode_uses_the_tokenizers_chat_template(tokenizer):
    """The tiny model's template is ChatML; no generation prompt is appended."""
    turns = [user("hi"), assistant("hello"), user("2+2?"), assistant("4")]
    assert render_rm_input("hf", tokenizer, "Be brief.", turns) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n")
    # system=None leaves the system choice to the chat template (ChatML: none)
    assert render_rm_input("hf", tokenizer, None, turns[:2]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")


def test_hf_mode_without_a_chat_template_is_an_error(tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat_template"):
        render_rm_input("hf", NoTemplate(), None, [user("hi"), assistant("hello")])


@pytest.mark.parametrize("turns", [[], [user("hi")], [user("hi"), assistant("hello"), user("and?")]])
@pytest.mark.parametrize("template", ["nemo", "hf"])
def test_conversation_must_end_with_an_assistant_turn(tokenizer, template, turns):
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        render_rm_input(template, tokenizer, None, turns)


def test_unknown_template_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        render_rm_input("chatml", tokenizer, None, [user("hi"), assistant("hello")])


@pytest.fixture()
def bos_eos_tokenizer(tiny_model_dir):
    """The tiny tokenizer with a post-processor that adds BOS and EOS (as Llama tokenizers do)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A {tok.eos_token}",
        special_tokens=[(tok.bos_token, tok.bos_token_id), (tok.eos_token, tok.eos_token_id)])
    return tok


@pytest.mark.parametrize("template", ["nemo", "hf"])
def test_tokenize_rm_input_adds_no_bos_or_eos(bos_eos_tokenizer, template):
    tok = bos_eos_tokenizer
    turns = [user("Why is the sky blue?"), assistant("Rayleigh scattering.")]
    text = render_rm_input(template, tok, None, turns)
    with_specials = tok(text)["input_ids"]
    assert with_specials[0] == tok.bos_token_id and with_specials[-1] == tok.eos_token_id  # the fixture works
    ids = tokenize_rm_input(template, tok, None, turns)
    assert ids == with_specials[1:-1] == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] != tok.bos_token_id
    assert tok.decode(ids) == text  # nothing added, nothing lost


def test_nemo_rm_input_ends_with_the_label_start_token(tokenizer):
    """The RM head reads the last token: for template=nemo that is <extra_id_2> (one token here)."""
    ids = tokenize_rm_input("nemo", tokenizer, None, [user("hi"), assistant("hello")])
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<extra_id_2>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<extra_id_0>")
