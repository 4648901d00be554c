"""Stage-3 data: labeled conversations -> token ids + loss masks -> per-rank micro-batches of rows.

- Encoding (`encode_examples`): every conversation is rendered with its attribute strings
  (`sft_template`), checked against `max_length` (over_length = error | skip, counted: never
  truncated) and dropped if it has no trained token (counted).
- Attribute dropout (`attribute_dropout` = p): each attribute of each labeled turn is left out of
  the label string with probability p, re-drawn every epoch from (seed, epoch, conversation,
  turn) — so any world size and a resumed run draw the same subsets — and a model trained so
  follows any subset of attributes a user specifies.
- Step plan (`plan_step`): a global batch is a fixed number of conversations (its order from
  `data.batching.global_batches`, independent of world size). With packing its conversations are
  packed into rows of <= pack_length tokens (BFD), otherwise each is its own row. Rows go to the
  rank with the fewest tokens so far (longest row first), then into micro-batches of
  `micro_batch_size` rows. Every rank runs the same number of micro-batches (a short rank gets
  weight-0 repeats), which collectives need.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..attributes import AttributeSchema
from ..data.packing import pack_sequences
from ..errors import ConfigError, DataError
from ..sft_template import SFTFormat, encode_conversation

OVER_LENGTH = ("error", "skip")


@dataclass
class EncodeReport:
    conversations: int = 0
    kept: int = 0
    skipped_over_length: int = 0
    skipped_no_trained_tokens: int = 0
    trailing_user_turns_dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    attribute_counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def drop_trailing_user_turns(turns: list) -> list:
    """A final user turn has no reply to learn from."""
    end = len(turns)
    while end and turns[end - 1]["role"] != "assistant":
        end -= 1
    return list(turns[:end])


def dropout_labels(turns: Sequence[dict], p: float, seed: int, epoch: int, conv_key: str) -> list[Optional[dict]]:
    """Each attribute of each labeled turn kept with probability 1-p; deterministic in (seed, epoch, conversation)."""
    if p <= 0:
        return [t.get("labels") for t in turns]
    rng = random.Random(f"{seed}/{epoch}/{conv_key}")  # str seeds hash with sha512: stable across processes
    out = []
    for t in turns:
        lab = t.get("labels")
        out.append({a: v for a, v in lab.items() if rng.random() >= p} if lab else lab)
    return out


def require_level(value: float, where: str, conv_id: str, k: int, attribute: str) -> None:
    """AC-SFT conditions on integer levels (the label string): a fractional label is refused, never rounded."""
    if value != int(value):
        raise DataError(where, None, f"conversation {conv_id} turns[{k}].labels.{attribute}",
                        f"{value:g} is not an integer level; SFT trains on the label string's levels, so round "
                        f"these labels in the data (or relabel with recipes/label.py)")


def encode_examples(conversations: Sequence[dict], fmt: SFTFormat, tokenizer, schema: AttributeSchema, *,
                    max_length: int, over_length: str, where: str) -> tuple[list[dict], EncodeReport]:
    """Validate and encode with full label strings (the longest form); return kept examples + counts."""
    if over_length not in OVER_LENGTH:
        raise ConfigError(f"over_length={over_length!r}: SFT takes one of {OVER_LENGTH} (never truncated)")
    rep = EncodeReport(attribute_counts={a: 0 for a in schema.attributes})
    examples = []
    for conv in conversations:
        rep.conversations += 1
        turns = drop_trailing_user_turns(conv["turns"])
        for k, t in enumerate(turns):
            for a, v in (t.get("labels") or {}).items():
                require_level(v, where, conv["id"], k, a)
        rep.trailing_user_turns_dropped += len(conv["turns"]) - len(turns)
        if not turns:
            rep.skipped_no_trained_tokens += 1
            continue
        ids, mask = encode_conversation(fmt, tokenizer, schema, conv["system"], turns)
        if len(ids) > max_length:
            if over_length == "error":
                raise DataError(where, None, f"conversation {conv['id']}",
                                f"{len(ids)} tokens > max_length {max_length} (over_length=skip to skip such conversations)")
            rep.skipped_over_length += 1
            continue
        if not any(mask):
            rep.skipped_no_trained_tokens += 1
            continue
        for t in turns:
            for a in (t.get("labels") or {}):
                rep.attribute_counts[a] += 1
        rep.kept += 1
        rep.tokens += len(ids)
        rep.trained_tokens += sum(mask)
        examples.append({"id": conv["id"], "system": conv["system"], "turns": turns, "ids": ids, "mask": mask})
    return examples, rep


def encode_epoch(examples: Sequence[dict], fmt: SFTFormat, tokenizer, schema: AttributeSchema, *, dropout: float,
                 seed: int, epoch: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, mask) of every example for one epoch: cached encodings, or re-rendered under attribute dropout."""
    if dropout <= 0:
        return [(ex["ids"], ex["mask"]) for ex in examples]
    return [encode_conversation(fmt, tokenizer, schema, ex["system"], ex["turns"],
                                dropout_labels(ex["turns"], dropout, seed, epoch, ex["id"])) for ex in examples]


def level_offsets_epoch(examples: Sequence[dict], enc: Sequence[tuple], attributes: Sequence[str], centers: Sequence[float], *,
                        dropout: float, seed: int, epoch: int) -> list:
    """(T, A) level offsets ℓ − c of every example for one epoch (`level_steering.train`), from the same labels as
    `encode_epoch`'s strings (attribute dropout included: a dropped attribute has no offset)."""
    from ..steering.trained_levels import token_offsets

    out = []
    for ex, (_, mask) in zip(examples, enc):
        labels = dropout_labels(ex["turns"], dropout, seed, epoch, ex["id"])
        out.append(token_offsets(mask, [lab for t, lab in zip(ex["turns"], labels) if t["role"] == "assistant"],
                                 attributes, centers))
    return out


def contrast_epoch(examples: Sequence[dict], fmt: SFTFormat, tokenizer, schema: AttributeSchema, *,
                   attributes: Optional[Sequence[str]], dropout: float, seed: int, epoch: int,
                   other: str = "random") -> list[Optional[tuple[list[int], list[bool], str]]]:
    """Per example, (ids, mask, attribute): the conversation with its LAST assistant turn's label for one attribute
    moved to another level (None: that turn carries none of `attributes`, None = any). The attribute and the level
    are drawn per (seed, epoch, conversation); everything else is the epoch's rendering (same attribute dropout),
    so the two renderings differ only in that one value.

    other = "random": any level but the own one, uniformly. Every level is then as often the wrong one as the right
    one (for a uniform label distribution), so the only way to lower the loss is to read the label's direction.
    other = "far": the level farthest from the own one. It puts the ends of the scale on the wrong side ~4x as
    often as on the right one, and a model can lower the loss by learning "0 and 4 are unlikely" whatever the
    response: measured on the embedded default (docs/steerability.md, row 5)."""
    if other not in ("random", "far"):
        raise ConfigError(f"contrast.other={other!r}: expected random | far")
    levels = schema.levels()
    out: list[Optional[tuple[list[int], list[bool], str]]] = []
    for ex in examples:
        labels = dropout_labels(ex["turns"], dropout, seed, epoch, ex["id"])
        last = max(k for k, t in enumerate(ex["turns"]) if t["role"] == "assistant")
        own = labels[last] or {}
        names = [a for a in own if attributes is None or a in attributes]
        if not names:
            out.append(None)
            continue
        rng = random.Random(f"contrast/{seed}/{epoch}/{ex['id']}")
        a = rng.choice(sorted(names, key=schema.index))
        if other == "far":
            far = max(abs(v - own[a]) for v in levels)
            moved_to = rng.choice([v for v in levels if abs(v - own[a]) == far])
        else:
            moved_to = rng.choice([v for v in levels if v != own[a]])
        moved = list(labels)
        moved[last] = {**own, a: moved_to}
        out.append((*encode_conversation(fmt, tokenizer, schema, ex["system"], ex["turns"], moved), a))
    return out


def steerable_attributes(report: EncodeReport, schema: AttributeSchema) -> list[str]:
    """Attributes the model saw in training label strings, in schema order."""
    return [a for a in schema.attributes if report.attribute_counts.get(a, 0) > 0]


def plan_step(batch: Sequence[int], lengths: Sequence[int], *, packing: bool, pack_length: int, world_size: int,
              micro_batch_size: int) -> list[list[list[list[int]]]]:
    """-> per rank, a list of micro-batches; a micro-batch is a list of rows; a row lists sample indices.

    Every rank gets the same number of micro-batches; an empty micro-batch ([]) means "run a
    weight-0 dummy" for that rank.
    """
    if packing:
        bins = pack_sequences([lengths[i] for i in batch], pack_length)
        rows = [[batch[j] for j in b] for b in bins]
    else:
        rows = [[i] for i in batch]
    row_len = [sum(lengths[i] for i in r) for r in rows]
    order = sorted(range(len(rows)), key=lambda r: (-row_len[r], r))
    loads = [0] * world_size
    per_rank: list[list[list[int]]] = [[] for _ in range(world_size)]
    for r in order:  # longest row to the least loaded rank
        k = min(range(world_size), key=lambda j: (loads[j], j))
        per_rank[k].append(rows[r])
        loads[k] += row_len[r]
    micro = [[rk[m:m + micro_batch_size] for m in range(0, len(rk), micro_batch_size)] for rk in per_rank]
    n_micro = max(1, max(len(m) for m in micro))
    return [m + [[] for _ in range(n_micro - len(m))] for m in micro]
