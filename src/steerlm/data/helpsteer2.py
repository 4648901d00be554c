"""NVIDIA HelpSteer2 (hub id `nvidia/HelpSteer2`) -> canonical conversations and preference pairs.

Ratings rows (default config, splits train/validation)::

    {"prompt", "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"}

Each row is one response to a prompt rated 0..4 on five attributes; consecutive rows share a
prompt, so `group` is a hash of the prompt text. Multi-turn prompts carry the earlier turns inline,
in NeMo's template (first user turn unmarked)::

    "{user 1}\\n<extra_id_1>Assistant\\n{assistant 1}\\n<extra_id_1>User\\n{user 2}"

We split those into real turns (earlier assistant turns are unrated); the response becomes the
final, rated assistant turn.

Preference rows (`data_dir="preference"`, one hub split "train" whose rows carry `split`)::

    {"prompt", "response_1", "response_2", "preference_strength" in -3..3, "split", ...}

Negative strength means response_1 is better. Strength 0 (a tie) gives no pair and is counted.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

from ..attributes import HELPSTEER2_ATTRIBUTES, AttributeSchema
from ..errors import DataError
from .schema import Conversation, PreferencePair, make_turn, validate_conversation
from .split import prompt_group

HUB_ID = "nvidia/HelpSteer2"
PREFERENCE_DATA_DIR = "preference"
GROUP_PREFIX = "helpsteer2"  # shared by ratings and preference rows: same prompt, same group
_TURN_MARKER = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def normalize_split(name: str) -> str:
    """HelpSteer2 preference rows say "val"; the hub and NeMo-Aligner say "validation"."""
    return _SPLIT_ALIASES.get(name, name)


def _text_field(row: dict, key: str, where: str, line: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(where, line, key, f"missing or empty {key!r} text")
    return value


def split_prompt_turns(prompt: str, *, where: str = "<prompt>", line: Optional[int] = None) -> list:
    """A HelpSteer2 prompt string -> canonical turns (user first, unrated, ending with a user turn)."""
    parts = _TURN_MARKER.split(prompt)
    turns = [make_turn("user", parts[0])]
    for marker, content in zip(parts[1::2], parts[2::2]):
        turns.append(make_turn(marker.lower(), content))
    for i, t in enumerate(turns):
        if not t["content"].strip():
            raise DataError(where, line, "prompt", f"turn {i} ({t['role']}) of the multi-turn prompt is empty")
    if turns[-1]["role"] != "user":
        raise DataError(where, line, "prompt", "multi-turn prompt ends with an assistant turn, not a user turn")
    return turns


def _rating(row: dict, attribute: str, schema: AttributeSchema, where: str, line: int) -> float:
    if attribute not in schema:
        raise DataError(where, line, attribute,
                        f"attribute not in schema {schema.name!r} ({','.join(schema.attributes)}); "
                        f"choose a schema that has it or restrict `attributes`")
    value = row.get(attribute)
    if value is None or isinstance(value, bool):
        raise DataError(where, line, attribute, f"missing rating (got {value!r})")
    try:
        return schema.check_value(attribute, value)
    except ValueError as e:
        raise DataError(where, line, attribute, str(e)) from None


def helpsteer2_conversations(
    rows: Iterable[tuple[int, dict]],
    schema: AttributeSchema,
    *,
    where: str,
    id_prefix: str = "helpsteer2",
    attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES,
) -> tuple[list[Conversation], dict]:
    """Ratings rows -> one conversation per row, the response rated on `attributes`.

    `attributes` selects which rating columns become labels (e.g. ("helpfulness",) for the
    HelpSteer2-Preference stage-1 recipe); each must exist in `schema` and in every row.
    Returns (conversations, stats) with stats {source, format, rows_read, kept, skipped,
    multi_turn}; ratings rows are never skipped (a bad row is a DataError).
    """
    convs: list[Conversation] = []
    multi_turn = 0
    for line, row in rows:
        prompt = _text_field(row, "prompt", where, line)
        response = _text_field(row, "response", where, line)
        turns = split_prompt_turns(prompt, where=where, line=line)
        multi_turn += len(turns) > 1
        labels = {a: _rating(row, a, schema, where, line) for a in attributes}
        turns.append(make_turn("assistant", response, labels))
        conv = {"id": f"{id_prefix}/{line}", "group": prompt_group(GROUP_PREFIX, prompt),
                "system": None, "turns": turns, "source": "helpsteer2"}
        convs.append(validate_conversation(conv, schema, where=where, line=line))
    stats = {"source": where, "format": "helpsteer2", "rows_read": len(convs), "kept": len(convs),
             "skipped": {}, "multi_turn": multi_turn}
    return convs, stats


def _strength(row: dict, where: str, line: int) -> int:
    value = row.get("preference_strength")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or value != int(value) or not -3 <= value <= 3:
        raise DataError(where, line, "preference_strength", f"expected an integer in -3..3, got {value!r}")
    return int(value)


def helpsteer2_preference_pairs(
    rows: Iterable[tuple[int, dict]],
    *,
    where: str,
    split: Optional[str] = None,
    id_prefix: str = "helpsteer2-preference",
) -> tuple[list[PreferencePair], dict]:
    """Preference rows -> pairs (chosen by the sign of preference_strength, strength = |value|).

    With `split` ("train" / "validation"), rows whose own `split` field differs are left out and
    counted under skipped["other_split"]; ties (strength 0) under skipped["tie"]; a pair of equal
    texts under skipped["identical_responses"].
    Returns (pairs, stats) with stats {source, format, rows_read, kept, skipped}.
    """
    want = normalize_split(split) if split else None
    pairs: list[PreferencePair] = []
    skipped = {"tie": 0, "other_split": 0, "identical_responses": 0}
    n_read = 0
    for line, row in rows:
        n_read += 1
        if want is not None:
            row_split = row.get("split")
            if not isinstance(row_split, str):
                raise DataError(where, line, "split", f"no 'split' field to select split {split!r} with")
            if normalize_split(row_split) != want:
                skipped["other_split"] += 1
                continue
        prompt = _text_field(row, "prompt", where, line)
        response_1 = _text_field(row, "response_1", where, line)
        response_2 = _text_field(row, "response_2", where, line)
        strength = _strength(row, where, line)
        if strength == 0:
            skipped["tie"] += 1
            continue
        if response_1 == response_2:
            skipped["identical_responses"] += 1
            continue
        chosen, rejected = (response_1, response_2) if strength < 0 else (response_2, response_1)
        pairs.append({
            "id": f"{id_prefix}/{line}", "group": prompt_group(GROUP_PREFIX, prompt), "system": None,
            "context": split_prompt_turns(prompt, where=where, line=line),
            "chosen": chosen, "rejected": rejected, "strength": float(abs(strength)), "source": "helpsteer2",
        })
    stats = {"source": where, "format": "helpsteer2_preference", "rows_read": n_read, "kept": len(pairs),
             "skipped": skipped}
    return pairs, stats
