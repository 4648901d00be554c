"""NeMo-Aligner's SteerLM files <-> canonical conversations, so existing data can be imported
and our data exported for NeMo-Aligner.

Chat JSONL (annotation, AC-SFT and regression-converter input), one conversation per line::

    {"system": str, "mask": "User", "type": "VALUE_TO_TEXT",
     "conversations": [{"from": "User"|"Assistant", "value": str, "label": "quality:4,..."|null}]}

Regression JSONL (reward-model input), one rated assistant turn per line::

    {"text": "<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{u}\\n<extra_id_1>Assistant\\n{a}\\n<extra_id_2>",
     "label": [one float per schema attribute, -100 = not annotated]}

NeMo-Aligner writes its default system prompt (`NEMO_SYSTEM_PROMPT`) on every row; on import it
becomes `system=None` ("the template's default"), and None is written back as that prompt. Any
other system text is kept as is.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional

from ..attributes import AttributeSchema
from ..errors import DataError
from .schema import Conversation, make_turn, rated_samples, validate_conversation
from .split import prompt_group

NEMO_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_TEMPLATE = "<extra_id_0>System\n{value}\n"
USER_TEMPLATE = "<extra_id_1>User\n{value}\n"
ASSISTANT_TEMPLATE = "<extra_id_1>Assistant\n{value}\n"
LABEL_PREFIX = "<extra_id_2>"
_SYSTEM_HEADER = "<extra_id_0>System\n"
_TURN_HEADER = re.compile(r"<extra_id_1>(User|Assistant)\n")
_NEMO_ROLE = {"user": "User", "assistant": "Assistant"}


def _system_in(system) -> Optional[str]:
    return None if system is None or system == NEMO_SYSTEM_PROMPT else system


def _system_out(system: Optional[str]) -> str:
    return NEMO_SYSTEM_PROMPT if system is None else system


def _group(prefix: str, system: Optional[str], first_turn: str) -> str:
    # Rows that share a system prompt and opening user turn (paths of one OASST tree, the two
    # responses of a HelpSteer2 prompt) share a group.
    return prompt_group(prefix, f"{system or ''}\x00{first_turn}")


# NeMo-Aligner's enum-like chat fields -> the values steerlm reads the row correctly under (absent is fine).
# mask names the speaker whose turns are not trained on: steerlm trains on the assistant's, so only "User".
ENUM_FIELDS = {"mask": ("User",), "type": ("VALUE_TO_TEXT", "TEXT_TO_VALUE")}


def check_enum_fields(row: dict, where: str, line: int) -> None:
    for field, allowed in ENUM_FIELDS.items():
        if row.get(field) is not None and row[field] not in allowed:
            raise DataError(where, line, field, f"{row[field]!r} is not supported; expected one of "
                                                f"{', '.join(map(repr, allowed))} (or leave it out)")


# ------------------------------------------------------------------ chat JSONL
def nemo_chat_conversations(
    rows: Iterable[tuple[int, dict]], schema: AttributeSchema, *, where: str, id_prefix: str = "nemo_chat",
) -> tuple[list[Conversation], dict]:
    """Chat rows -> conversations; label strings parsed with `schema.parse_label`.

    An empty or null label means unrated. A label that names an unknown attribute or an off-scale
    value, or a label on a user turn, is a DataError naming `conversations[i].label`.
    Returns (conversations, stats) with stats {source, format, rows_read, kept, skipped, rated_turns}.
    """
    convs: list[Conversation] = []
    rated = 0
    for line, row in rows:
        check_enum_fields(row, where, line)
        conversations = row.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise DataError(where, line, "conversations", "missing or empty list of turns")
        turns = []
        for i, t in enumerate(conversations):
            if not isinstance(t, dict):
                raise DataError(where, line, f"conversations[{i}]", f"expected an object, got {type(t).__name__}")
            speaker = t.get("from")
            if speaker not in ("User", "Assistant"):
                raise DataError(where, line, f"conversations[{i}].from", f"{speaker!r} is not 'User' or 'Assistant'")
            role = "user" if speaker == "User" else "assistant"  # SteerLM rows always mask "User"
            value = t.get("value")
            if not isinstance(value, str) or not value.strip():
                raise DataError(where, line, f"conversations[{i}].value", "missing or empty text")
            label = t.get("label")
            labels = None
            if label is not None and not isinstance(label, str):
                raise DataError(where, line, f"conversations[{i}].label", f"expected a string or null, got {label!r}")
            if label and label.strip():
                if role != "assistant":
                    raise DataError(where, line, f"conversations[{i}].label", "only assistant turns carry labels")
                try:
                    labels = schema.parse_label(label) or None
                except ValueError as e:
                    raise DataError(where, line, f"conversations[{i}].label", str(e)) from None
            rated += labels is not None
            turns.append(make_turn(role, value, labels))
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(where, line, "system", f"expected a string, got {type(system).__name__}")
        system = _system_in(system)
        conv = {"id": f"{id_prefix}/{line}", "group": _group(id_prefix, system, turns[0]["content"]),
                "system": system, "turns": turns, "source": id_prefix}
        convs.append(validate_conversation(conv, schema, where=where, line=line))
    stats = {"source": where, "format": "nemo_chat", "rows_read": len(convs), "kept": len(convs),
             "skipped": {}, "rated_turns": rated}
    return convs, stats


def to_nemo_chat(conv: Conversation, schema: AttributeSchema, *, round_labels: bool = False) -> dict:
    """A canonical conversation -> one NeMo chat row (labels as ``name:value`` strings).

    `round_labels` clips and rounds to integers, as NeMo-Aligner's annotator writes them;
    the default keeps values exactly (``helpfulness:3.5``) so a round trip is lossless.
    """
    return {
        "system": _system_out(conv["system"]),
        "mask": "User",
        "type": "VALUE_TO_TEXT",
        "conversations": [
            {"from": _NEMO_ROLE[t["role"]], "value": t["content"],
             "label": schema.format_label(t["labels"], round_values=round_labels) if t["labels"] else None}
            for t in conv["turns"]
        ],
    }


# ------------------------------------------------------------------ regression JSONL
def render_nemo_text(system: Optional[str], turns: list) -> str:
    """System + turns in NeMo's template, ending with the label prefix (what the RM scores)."""
    text = SYSTEM_TEMPLATE.format(value=_system_out(system))
    for t in turns:
        text += (USER_TEMPLATE if t["role"] == "user" else ASSISTANT_TEMPLATE).format(value=t["content"])
    return text + LABEL_PREFIX


def parse_nemo_text(text: str, *, where: str = "<text>", line: Optional[int] = None) -> tuple[Optional[str], list]:
    """Invert `render_nemo_text`: (system or None, turns without labels); the trailing
    ``<extra_id_2>`` is optional. A text that is not in the template is a DataError on `text`."""
    if text.endswith(LABEL_PREFIX):
        text = text[: -len(LABEL_PREFIX)]
    parts = _TURN_HEADER.split(text)
    head, system = parts[0], None
    if head.startswith(_SYSTEM_HEADER):
        system = head[len(_SYSTEM_HEADER):]
        if not system.endswith("\n"):
            raise DataError(where, line, "text", "system block does not end with a newline")
        system = _system_in(system[:-1])
    elif head:
        raise DataError(where, line, "text", f"text before the first turn is not a system block: {head[:40]!r}")
    if len(parts) < 3:
        raise DataError(where, line, "text", "no '<extra_id_1>User' / '<extra_id_1>Assistant' turns found")
    turns = []
    for i, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2])):
        if not content.endswith("\n"):
            raise DataError(where, line, "text", f"turn {i} ({speaker}) does not end with a newline")
        turns.append(make_turn(speaker.lower(), content[:-1]))
    return system, turns


def nemo_regression_conversations(
    rows: Iterable[tuple[int, dict]], schema: AttributeSchema, *, where: str, id_prefix: str = "nemo_regression",
) -> tuple[list[Conversation], dict]:
    """Regression rows -> conversations whose last (assistant) turn carries the label vector.

    The vector must have one entry per schema attribute; `schema.missing` (-100) entries are absent
    labels. A row whose entries are all missing has nothing to train on and is counted under
    skipped["no_labels"]. Returns (conversations, stats).
    """
    convs: list[Conversation] = []
    skipped = {"no_labels": 0}
    n_read = 0
    for line, row in rows:
        n_read += 1
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(where, line, "text", "missing or empty text")
        vector = row.get("label")
        if not isinstance(vector, list):
            raise DataError(where, line, "label", f"expected a list of {len(schema)} numbers, got {vector!r}"[:160])
        if len(vector) != len(schema):
            raise DataError(where, line, "label", f"has {len(vector)} entries, schema {schema.name!r} has "
                                                  f"{len(schema)} ({','.join(schema.attributes)})")
        try:
            labels = schema.from_vector([float(v) for v in vector])
            for name, v in labels.items():
                schema.check_value(name, v)
        except (TypeError, ValueError) as e:
            raise DataError(where, line, "label", str(e)) from None
        system, turns = parse_nemo_text(text, where=where, line=line)
        if turns[-1]["role"] != "assistant":
            raise DataError(where, line, "text", "the last turn is not an assistant turn, so nothing is rated")
        if not labels:
            skipped["no_labels"] += 1
            continue
        turns[-1]["labels"] = labels
        conv = {"id": f"{id_prefix}/{line}", "group": _group(id_prefix, system, turns[0]["content"]),
                "system": system, "turns": turns, "source": id_prefix}
        convs.append(validate_conversation(conv, schema, where=where, line=line))
    stats = {"source": where, "format": "nemo_regression", "rows_read": n_read, "kept": len(convs),
             "skipped": skipped}
    return convs, stats


def to_nemo_regression(conv: Conversation, schema: AttributeSchema) -> list[dict]:
    """A canonical conversation -> one regression row per rated assistant turn (NeMo-Aligner's
    `process_to_regression_format` expansion). Each row carries only its scored turn's labels;
    earlier assistant turns are plain text, as in NeMo-Aligner."""
    return [{"text": render_nemo_text(s["system"], s["turns"]), "label": schema.to_vector(s["labels"])}
            for s in rated_samples([conv])]


# ------------------------------------------------------------------ writers
def _write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write rows atomically (tmp file + rename); returns the number of rows."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for n, row in enumerate(rows, start=1):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return n


def write_nemo_chat(conversations: Iterable[Conversation], path: str | os.PathLike, schema: AttributeSchema,
                    *, round_labels: bool = False) -> int:
    """Write conversations as NeMo chat JSONL; returns the number of rows written."""
    return _write_jsonl((to_nemo_chat(c, schema, round_labels=round_labels) for c in conversations), path)


def write_nemo_regression(conversations: Iterable[Conversation], path: str | os.PathLike,
                          schema: AttributeSchema) -> int:
    """Write one NeMo regression row per rated assistant turn; returns the number of rows written."""
    return _write_jsonl((row for c in conversations for row in to_nemo_regression(c, schema)), path)
