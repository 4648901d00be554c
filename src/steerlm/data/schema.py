"""The one canonical conversation schema every loader produces and every stage consumes.

A conversation is a plain dict (JSON-serialisable, so it round-trips through JSONL and HF
`datasets` unchanged)::

    {
      "id":     "oasst1/6ab24d72-...",      # unique within a dataset
      "group":  "oasst1/tree/6ab24d72-...", # split key: held-out splits never separate a group
      "system": "A chat between ...",       # or None: the template's default system prompt
      "turns":  [{"role": "user", "content": "...", "labels": None},
                 {"role": "assistant", "content": "...", "labels": {"quality": 3.0, "humor": 0.0}}],
      "source": "oasst1",
    }

`labels` is None on user turns and on unrated assistant turns; on a rated assistant turn it maps
attribute name -> value on the schema's scale, listing only the attributes that were annotated
(missing ones are absent, never a magic number).

A preference pair keeps both responses together by construction::

    {"id", "group", "system", "context": [turns ending with a user turn],
     "chosen": str, "rejected": str, "strength": float >= 0, "source"}
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, TypedDict

from ..attributes import AttributeSchema
from ..errors import DataError

ROLES = ("user", "assistant")


class Turn(TypedDict):
    role: str
    content: str
    labels: Optional[dict]


class Conversation(TypedDict):
    id: str
    group: str
    system: Optional[str]
    turns: list
    source: str


class PreferencePair(TypedDict):
    id: str
    group: str
    system: Optional[str]
    context: list
    chosen: str
    rejected: str
    strength: float
    source: str


def make_turn(role: str, content: str, labels: Optional[dict] = None) -> Turn:
    return {"role": role, "content": content, "labels": labels}


def validate_conversation(conv: dict, schema: AttributeSchema, *, where: str, line: Optional[int]) -> Conversation:
    """Check a conversation against the canonical schema and `schema`; raise a one-line DataError.

    Validates roles, non-empty contents, labels only on assistant turns, and every label name and
    value against the attribute schema. Returns the conversation with label values as floats.
    """
    turns = conv.get("turns")
    if not isinstance(turns, list) or not turns:
        raise DataError(where, line, "turns", "conversation has no turns")
    for k in ("id", "group", "source"):
        if not isinstance(conv.get(k), str) or not conv.get(k):
            raise DataError(where, line, k, f"missing or empty {k!r}")
    system = conv.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(where, line, "system", f"expected a string or null, got {type(system).__name__}")
    clean = []
    for i, t in enumerate(turns):
        role, content, labels = t.get("role"), t.get("content"), t.get("labels")
        if role not in ROLES:
            raise DataError(where, line, f"turns[{i}].role", f"role {role!r} is not one of {ROLES}")
        if not isinstance(content, str) or not content.strip():
            what = "prompt" if role == "user" else "response"
            raise DataError(where, line, f"turns[{i}].content", f"missing or empty {what} text")
        if labels is not None:
            if role != "assistant":
                raise DataError(where, line, f"turns[{i}].labels", "only assistant turns carry attribute labels")
            if not isinstance(labels, dict):
                raise DataError(where, line, f"turns[{i}].labels", f"expected a dict, got {type(labels).__name__}")
            try:
                labels = {name: schema.check_value(name, v) for name, v in labels.items()}
            except ValueError as e:
                raise DataError(where, line, f"turns[{i}].labels", str(e)) from None
            labels = labels or None
        clean.append(make_turn(role, content, labels))
    if clean[0]["role"] != "user":  # a reply with no prompt: the RM would rate it, SFT would train on it
        raise DataError(where, line, "turns[0].role", f"a conversation must start with a user turn (the system "
                                                      f"prompt is the 'system' field), not {clean[0]['role']!r}")
    return {"id": conv["id"], "group": conv["group"], "system": system, "turns": clean, "source": conv["source"]}


def rated_samples(conversations: Iterable[Conversation]) -> Iterator[dict]:
    """One sample per rated assistant turn: the conversation cut after that turn.

    Yields ``{"id": "<conv id>#<turn index>", "group", "system", "turns": turns[:k+1], "labels",
    "source"}``; this is the unit the reward model regresses (NeMo-Aligner's
    `process_to_regression_format` does the same expansion).
    """
    for conv in conversations:
        for k, turn in enumerate(conv["turns"]):
            if turn["role"] == "assistant" and turn["labels"]:
                yield {
                    "id": f"{conv['id']}#{k}",
                    "group": conv["group"],
                    "system": conv["system"],
                    "turns": conv["turns"][: k + 1],
                    "labels": dict(turn["labels"]),
                    "source": conv["source"],
                }


def label_counts(samples: Iterable[dict], schema: AttributeSchema) -> dict[str, int]:
    """How many samples annotate each attribute (0 means that head is never trained)."""
    counts = {a: 0 for a in schema.attributes}
    for s in samples:
        for a in s["labels"]:
            counts[a] += 1
    return counts
