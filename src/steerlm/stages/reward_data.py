"""Reward-stage data: canonical conversations -> tokenized rated samples and preference pairs.

Every sample keeps its provenance (`id`, `source`) so an over-length or malformed sample is
reported by name. Over-length policy (`over_length`): "error" stops with a one-line message;
"skip" drops the sample and counts it. Nothing is ever truncated: a truncated RM input would
be scored at the wrong token.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..attributes import AttributeSchema
from ..data.schema import rated_samples
from ..errors import ConfigError, DataError
from ..models.reward_model import check_pad_token
from ..templates import tokenize_rm_input

OVER_LENGTH_POLICIES = ("error", "skip")


@dataclass
class TokenizeReport:
    """What happened to every sample on its way to the model."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    tokens: int = 0

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "tokens": self.tokens}


def _check_length(n: int, max_length: int, policy: str, what: str, report: TokenizeReport) -> bool:
    if n <= max_length:
        return True
    if policy == "error":
        raise DataError(what, None, "length",
                        f"{n} tokens > max_length {max_length} (set over_length=skip to drop and count such samples)")
    if policy != "skip":
        raise ConfigError(f"unknown over_length policy {policy!r}; choose one of {OVER_LENGTH_POLICIES}")
    report.skipped["over_length"] += 1
    return False


def tokenize_rated(conversations: Sequence[dict], schema: AttributeSchema, tokenizer, *, template: str,
                   max_length: int, over_length: str) -> tuple[list[dict], TokenizeReport]:
    """One record per rated assistant turn: {id, group, source, input_ids, labels (K, missing marked)}."""
    report = TokenizeReport()
    out = []
    for s in rated_samples(conversations):
        ids = tokenize_rm_input(template, tokenizer, s["system"], s["turns"])
        if not _check_length(len(ids), max_length, over_length, f"{s['source']} sample {s['id']}", report):
            continue
        check_pad_token(ids, tokenizer.pad_token_id, f"{s['source']} sample {s['id']}")
        out.append({"id": s["id"], "group": s["group"], "source": s["source"], "input_ids": ids,
                    "labels": schema.to_vector(s["labels"]), "context": _context_key(s),
                    "words": len(s["turns"][-1]["content"].split())})
        report.kept += 1
        report.tokens += len(ids)
    return out, report


def _context_key(sample: dict) -> str:
    """Samples answering the same conversation prefix share this key (used to build eval pairs)."""
    return sample["group"] + "\x00" + "\x00".join(t["content"] for t in sample["turns"][:-1])


def tokenize_pairs(pairs: Sequence[dict], tokenizer, *, template: str, max_length: int,
                   over_length: str) -> tuple[list[dict], TokenizeReport]:
    """Preference pairs -> {id, group, source, chosen_ids, rejected_ids, strength}; both sides kept together."""
    report = TokenizeReport()
    out = []
    for p in pairs:
        sides = []
        for resp in (p["chosen"], p["rejected"]):
            turns = list(p["context"]) + [{"role": "assistant", "content": resp, "labels": None}]
            sides.append(tokenize_rm_input(template, tokenizer, p["system"], turns))
        n = max(len(sides[0]), len(sides[1]))
        if not _check_length(n, max_length, over_length, f"{p['source']} pair {p['id']}", report):
            continue
        for ids in sides:
            check_pad_token(ids, tokenizer.pad_token_id, f"{p['source']} pair {p['id']}")
        out.append({"id": p["id"], "group": p["group"], "source": p["source"], "chosen_ids": sides[0],
                    "rejected_ids": sides[1], "strength": float(p["strength"])})
        report.kept += 1
        report.tokens += len(sides[0]) + len(sides[1])
    return out, report


def same_context_pairs(samples: Sequence[dict], weights: Sequence[float], missing: float) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs among samples that answer the same prefix.

    A pair needs both samples to annotate every attribute with a non-zero weight and to differ in
    the weighted human score (HelpSteer2 has 2 responses per prompt: this yields its pairs).
    """
    by_context = defaultdict(list)
    for i, s in enumerate(samples):
        by_context[s["context"]].append(i)
    used = [k for k, w in enumerate(weights) if w != 0]
    pairs = []
    for idx in by_context.values():
        scored = []
        for i in idx:
            lab = samples[i]["labels"]
            if used and all(lab[k] != missing for k in used):
                scored.append((sum(weights[k] * lab[k] for k in used), i))
        for a in range(len(scored)):
            for b in range(a + 1, len(scored)):
                (sa, ia), (sb, ib) = scored[a], scored[b]
                if sa != sb:
                    pairs.append((ia, ib) if sa > sb else (ib, ia))
    return pairs


def train_label_means(samples: Sequence[dict], schema: AttributeSchema) -> dict[str, float]:
    """Per-attribute mean over the training samples that annotate it (the baseline predictor)."""
    sums, counts = [0.0] * len(schema), [0] * len(schema)
    for s in samples:
        for k, v in enumerate(s["labels"]):
            if v != schema.missing:
                sums[k] += v
                counts[k] += 1
    return {a: sums[k] / counts[k] for k, a in enumerate(schema.attributes) if counts[k]}


def train_label_counts(samples: Sequence[dict], schema: AttributeSchema) -> dict[str, dict[str, int]]:
    """Per attribute, training labels per integer level ({"0": n0, ...}): the target of label calibration."""
    levels = schema.levels()
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        for a, v in zip(schema.attributes, s["labels"]):
            if v != schema.missing:
                lv = min(levels, key=lambda x: abs(x - v))  # HelpSteer2 / OASST labels are integers already
                c = out.setdefault(a, {f"{x:g}": 0 for x in levels})
                c[f"{lv:g}"] += 1
    return out


def annotated_attributes(samples: Sequence[dict], schema: AttributeSchema) -> list[str]:
    """Attributes with at least one training label: the heads this RM actually learns."""
    return [a for a in train_label_means(samples, schema)]


def summarize_lengths(lengths: Sequence[int]) -> Optional[dict]:
    if not lengths:
        return None
    s = sorted(lengths)
    return {"n": len(s), "min": s[0], "median": s[len(s) // 2], "max": s[-1], "total": sum(s)}
