"""Prompt templates: NeMo-Aligner's exact SteerLM rendering, and the tokenizer's own chat template.

NeMo mode reproduces `examples/nlp/data/steerlm/common.py` of NVIDIA/NeMo-Aligner (af2b3bd9)::

    <extra_id_0>System\\n{system}\\n
    <extra_id_1>User\\n{user}\\n
    <extra_id_1>Assistant\\n{response}\\n
    <extra_id_2>                      <- RM input ends here: the head reads this token

and, for attribute-conditioned SFT, an assistant turn ``<extra_id_1>Assistant\\n<extra_id_2>{labels}\\n{response}\\n``.
The RM input is the conversation up to and including the rated assistant turn, without labels
on earlier turns (as NeMo-Aligner's `process_to_regression_format`), plus the label-start token.

HF mode renders the same turns with `tokenizer.apply_chat_template` so any instruct model's own
format is used; the RM reads the last token of the rendered conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# NeMo-Aligner's SYSTEM_PROMPT (common.py); used when a conversation has no system prompt.
NEMO_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_START = "<extra_id_0>"
TURN_START = "<extra_id_1>"
LABEL_START = "<extra_id_2>"
END_OF_TURN = "\n"
END_OF_NAME = "\n"
ROLE_NAMES = {"user": "User", "assistant": "Assistant"}

TEMPLATES = ("nemo", "hf")


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether its tokens are trained on (SFT loss mask)."""

    text: str
    trainable: bool = False


def nemo_turn(role: str, content: str) -> str:
    return f"{TURN_START}{ROLE_NAMES[role]}{END_OF_NAME}{content}{END_OF_TURN}"


def nemo_system(system: Optional[str]) -> str:
    return f"{SYSTEM_START}System{END_OF_NAME}{NEMO_SYSTEM_PROMPT if system is None else system}{END_OF_TURN}"


def render_nemo_rm_input(system: Optional[str], turns: Sequence[dict]) -> str:
    """NeMo-Aligner's regression-RM text: system + turns (no labels) + ``<extra_id_2>``."""
    return nemo_system(system) + "".join(nemo_turn(t["role"], t["content"]) for t in turns) + LABEL_START


def chat_messages(system: Optional[str], turns: Sequence[dict]) -> list[dict]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": t["role"], "content": t["content"]} for t in turns]


def render_hf_rm_input(tokenizer, system: Optional[str], turns: Sequence[dict]) -> str:
    """The tokenizer's chat template over the conversation (no generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template=hf needs a tokenizer with a chat_template; use template=nemo for base models")
    return tokenizer.apply_chat_template(chat_messages(system, turns), tokenize=False, add_generation_prompt=False)


def render_rm_input(template: str, tokenizer, system: Optional[str], turns: Sequence[dict]) -> str:
    """Text the reward model scores for a conversation whose last turn is the rated response."""
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError("the reward model scores a conversation that ends with an assistant turn")
    if template == "nemo":
        return render_nemo_rm_input(system, turns)
    if template == "hf":
        return render_hf_rm_input(tokenizer, system, turns)
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")


def tokenize_rm_input(template: str, tokenizer, system: Optional[str], turns: Sequence[dict]) -> list[int]:
    """Token ids of the RM input. No BOS/EOS is added beyond what the template writes.

    NeMo-Aligner tokenizes with `text_to_ids` (no BOS, no EOS); HF chat templates carry their own
    special tokens, so `add_special_tokens=False` in both modes keeps training, labeling and
    `AutoModelForSequenceClassification` users on the same ids.
    """
    text = render_rm_input(template, tokenizer, system, turns)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
