"""Attribute-conditioned SFT rendering: a conversation -> token ids + the loss mask; an inference prompt.

NeMo mode is NeMo-Aligner's AC-SFT format (`gpt_sft_chat_dataset.py`, research notes section 5)::

    <extra_id_0>System\\n{system}\\n                     masked
    <extra_id_1>User\\n{user}\\n                         masked
    <extra_id_1>Assistant\\n                            masked (turn name)
    <extra_id_2>{labels}\\n                             masked (the attribute string conditions, never predicted)
    {response}\\n                                       TRAINED
    <extra_id_1>                                       TRAINED (end of the assistant turn = the stop string)
    User\\n{user}\\n ...                                 masked

HF mode renders the turns with the tokenizer's own chat template and inserts the same attribute
segment right after the assistant header; the trained span is the response plus the template's
end-of-turn string (the first of `stop_strings` after the response), e.g. ChatML's `<|im_end|>`.

Tokenization is one call over the whole rendered text (what the model sees at inference), and the
mask comes from character offsets: a token is trained only if all of its characters lie in trained
segments, so a token straddling the attribute string is never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .attributes import AttributeSchema
from .errors import ConfigError
from .templates import (LABEL_START, TURN_START, Segment, chat_messages, nemo_system)

SFT_TEMPLATES = ("nemo", "hf")


@dataclass(frozen=True)
class SFTFormat:
    """How conversations are rendered for a policy; saved with the checkpoint (`steerlm_sft.json`)."""

    template: str = "nemo"
    label_start: str = LABEL_START
    stop_strings: tuple[str, ...] = ()  # HF mode: () = the tokenizer's eos token

    def resolved_stop_strings(self, tokenizer) -> list[str]:
        if self.template == "nemo":
            return [TURN_START]
        stops = list(self.stop_strings) or [tokenizer.eos_token]
        if not all(stops):
            raise ConfigError("template=hf needs stop_strings (the tokenizer has no eos token)")
        return stops

    def label_segment(self, label: str) -> list[Segment]:
        return [Segment(f"{self.label_start}{label}\n", False)] if label else []

    def to_dict(self) -> dict:
        return {"template": self.template, "label_start": self.label_start, "stop_strings": list(self.stop_strings)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SFTFormat":
        if d.get("template") not in SFT_TEMPLATES:
            raise ConfigError(f"unknown template {d.get('template')!r}; choose one of {SFT_TEMPLATES}")
        return cls(d["template"], d.get("label_start", LABEL_START), tuple(d.get("stop_strings") or ()))


def label_string(schema: AttributeSchema, labels: Optional[Mapping[str, float]]) -> str:
    """`name:value,...` in schema order, values clipped and rounded; absent attributes omitted."""
    return schema.format_label(labels) if labels else ""


# ----------------------------------------------------------------------------- rendering
def nemo_segments(fmt: SFTFormat, system: Optional[str], turns: Sequence[dict], labels: Sequence[str],
                  *, prompt: bool = False) -> list[Segment]:
    """NeMo AC-SFT segments. `labels[i]` is the label string of turn i ("" = none).

    `prompt=True` renders an inference prompt: `turns` ends with a user turn and the assistant
    header + attribute segment for the reply are appended.
    """
    segs = [Segment(nemo_system(system), False)]
    prev_assistant = False
    for t, label in zip(turns, labels):
        if t["role"] == "user":
            # the <extra_id_1> that closes an assistant turn is trained (NeMo keeps it in the loss)
            segs.append(Segment(TURN_START, prev_assistant))
            segs.append(Segment(f"User\n{t['content']}\n", False))
        else:
            segs.append(Segment(f"{TURN_START}Assistant\n", False))
            segs += fmt.label_segment(label)
            segs.append(Segment(f"{t['content']}\n", True))
        prev_assistant = t["role"] == "assistant"
    if prompt:
        segs.append(Segment(f"{TURN_START}Assistant\n", False))
    elif prev_assistant:
        segs.append(Segment(TURN_START, True))  # NeMo appends it after a final assistant turn: the stop string
    return segs


def hf_segments(fmt: SFTFormat, tokenizer, system: Optional[str], turns: Sequence[dict], labels: Sequence[str],
                *, prompt: bool = False) -> list[Segment]:
    """Chat-template segments: each assistant turn = header (masked) + attribute segment (masked) +
    response and end-of-turn string (trained) + whatever the template writes after it (masked)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("template=hf needs a tokenizer with a chat_template; use template=nemo for base models")
    stops = fmt.resolved_stop_strings(tokenizer)
    msgs = chat_messages(system, turns)
    offset = 0 if system is None else 1
    segs: list[Segment] = []
    done = ""  # template text already emitted (without our attribute segments)
    render = tokenizer.apply_chat_template
    for i, (t, label) in enumerate(zip(turns, labels)):
        if t["role"] != "assistant":
            continue
        header = render(msgs[:offset + i], tokenize=False, add_generation_prompt=True)
        full = render(msgs[:offset + i + 1], tokenize=False, add_generation_prompt=False)
        if not header.startswith(done) or not full.startswith(header):
            raise ConfigError("template=hf: the chat template does not render conversations prefix-by-prefix "
                              "(it rewrites earlier turns); use template=nemo")
        segs.append(Segment(header[len(done):], False))
        segs += fmt.label_segment(label)
        reply = full[len(header):]
        content = t["content"] if t["content"] in reply else t["content"].strip()  # some templates trim
        start = reply.find(content)
        ends = [(reply.find(s, start + len(content)), s) for s in stops]
        ends = [(p, s) for p, s in ends if p >= 0]
        if start < 0 or not ends:
            raise ConfigError(f"template=hf: the chat template does not close assistant turns with any of "
                              f"stop_strings {stops}; set sft_format.stop_strings")
        pos, stop = min(ends)
        cut = pos + len(stop)
        if start:
            segs.append(Segment(reply[:start], False))
        segs.append(Segment(reply[start:cut], True))
        if reply[cut:]:
            segs.append(Segment(reply[cut:], False))
        done = full
    if prompt:
        header = render(msgs, tokenize=False, add_generation_prompt=True)
        if not header.startswith(done):
            raise ConfigError("template=hf: the chat template does not render conversations prefix-by-prefix; use template=nemo")
        segs.append(Segment(header[len(done):], False))
    elif turns and turns[-1]["role"] == "user":
        rest = render(msgs, tokenize=False, add_generation_prompt=False)
        segs.append(Segment(rest[len(done):], False))
    return segs


def render_segments(fmt: SFTFormat, tokenizer, system: Optional[str], turns: Sequence[dict], labels: Sequence[str],
                    *, prompt: bool = False) -> list[Segment]:
    if fmt.template == "nemo":
        return nemo_segments(fmt, system, turns, labels, prompt=prompt)
    if fmt.template == "hf":
        return hf_segments(fmt, tokenizer, system, turns, labels, prompt=prompt)
    raise ConfigError(f"unknown template {fmt.template!r}; choose one of {SFT_TEMPLATES}")


# ----------------------------------------------------------------------------- tokenization
def tokenize_segments(tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[bool]]:
    """One tokenizer call over the joined text -> (ids, trained). Needs a fast tokenizer (offsets)."""
    text = "".join(s.text for s in segments)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer: SFT loss masks need character offsets")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # per-character trained flag, then a token is trained iff every character it covers is
    char_trained = bytearray(len(text))
    pos = 0
    for s in segments:
        if s.trainable:
            char_trained[pos:pos + len(s.text)] = b"\x01" * len(s.text)
        pos += len(s.text)
    mask = []
    for a, b in enc["offset_mapping"]:
        mask.append(b > a and all(char_trained[a:b]))
    return list(enc["input_ids"]), mask


def encode_conversation(fmt: SFTFormat, tokenizer, schema: AttributeSchema, system: Optional[str],
                        turns: Sequence[dict], labels: Optional[Sequence[Optional[Mapping]]] = None):
    """Training ids and loss mask. `labels[i]` overrides turn i's labels (e.g. after attribute dropout)."""
    labels = [t.get("labels") for t in turns] if labels is None else labels
    strings = [label_string(schema, lab) if t["role"] == "assistant" else "" for t, lab in zip(turns, labels)]
    return tokenize_segments(tokenizer, render_segments(fmt, tokenizer, system, turns, strings))


def prompt_ids(fmt: SFTFormat, tokenizer, schema: AttributeSchema, system: Optional[str], turns: Sequence[dict],
               attributes: Mapping[str, float]) -> list[int]:
    """Inference prompt: the conversation so far (ending with a user turn) + assistant header + attributes."""
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a generation prompt ends with a user turn")
    strings = [label_string(schema, t.get("labels")) if t["role"] == "assistant" else "" for t in turns]
    segs = render_segments(fmt, tokenizer, system, turns, strings, prompt=True)
    segs += fmt.label_segment(label_string(schema, attributes))
    return tokenize_segments(tokenizer, segs)[0]
