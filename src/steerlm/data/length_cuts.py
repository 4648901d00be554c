"""Length-contrast copies for AC-SFT: the same prompt answered at several lengths, labeled by length.

Why (docs/steerability.md): a response's length is decided by one token, the end of turn, and plain
AC-SFT on ~1k conversations never learns to tie it to the verbosity string: the string's share of a
response's likelihood is tiny, and no two training answers share a prompt and differ only in length.
A copy of an answer cut at a sentence or paragraph boundary, labeled with the verbosity level its
length has in the training set, gives the model exactly that pair: the same prompt, the same opening,
and the end of turn at two places, with the label as the only cue.

Levels by length. ℓ(w) = the quantile bin of w words among the training set's final answers, cut at
the (k/L) quantiles for L levels, so every level holds as many answers. `relabel=True` also sets the
originals' label to ℓ(their length), making the attribute mean "answer length" exactly; False keeps
their labels (e.g. the RM's, calibrated) and labels only the copies by length.
"""

from __future__ import annotations

import bisect
import random
import re
from typing import Callable, Optional, Sequence

import numpy as np

BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n+")  # after a sentence end, or a line break


def words(text: str) -> int:
    return len(text.split())


def cut_points(text: str) -> list[int]:
    """Character offsets where a piece (sentence or paragraph) ends, before the text's own end."""
    ends = sorted({m.start() for m in BOUNDARY.finditer(text)})
    return [e for e in ends if text[:e].strip() and text[e:].strip()]


def length_bins(counts: Sequence[int], levels: Sequence[int]) -> list[float]:
    """Word-count cut points between consecutive levels: the k/L quantiles of `counts`."""
    qs = [k / len(levels) for k in range(1, len(levels))]
    return [float(x) for x in np.quantile(np.asarray(counts, dtype=float), qs)]


def level_of(n_words: int, bins: Sequence[float], levels: Sequence[int]) -> int:
    return int(levels[bisect.bisect_right(bins, n_words)])


def length_cut_copies(conversations: Sequence[dict], attribute: str, levels: Sequence[int], *, copies: int = 1,
                      relabel: bool = True, min_words: int = 3, seed: int = 0,
                      fits: Optional[Callable[[dict], bool]] = None) -> tuple[list[dict], dict]:
    """conversations (canonical: id, system, turns) -> (the originals, relabeled if asked, + cut copies, stats).

    Only conversations that end in an assistant turn take part. Each gets up to `copies` copies, each cut
    at a different boundary whose prefix has >= min_words words and a lower level than the whole answer.

    fits(conv) says whether a conversation fits the trainer's max_length. The levels are the quantiles of
    the answers that fit (those that do not are skipped by the trainer: bins over all answers left the top
    level with almost no training answers). A whole answer that does not fit still gives copies: cuts that
    fit, at any level, so the long end of the scale is trained at all.
    """
    fits = fits or (lambda conv: True)
    ends = [c for c in conversations if c["turns"] and c["turns"][-1]["role"] == "assistant"]
    fit = {id(c): fits(c) for c in ends}
    bins = length_bins([words(c["turns"][-1]["content"]) for c in ends if fit[id(c)]], levels) if ends else []
    rng = random.Random(f"length_cuts/{seed}")
    out, made, relabeled, from_long = [], 0, 0, 0
    per_level = {int(v): 0 for v in levels}
    for conv in conversations:
        last = conv["turns"][-1] if conv["turns"] else None
        if last is None or last["role"] != "assistant":
            out.append(conv)
            continue
        text, whole_fits = last["content"], fit[id(conv)]
        whole = level_of(words(text), bins, levels)
        if relabel:
            conv = with_last(conv, text, attribute, whole)
            relabeled += 1
        out.append(conv)
        options = [e for e in cut_points(text) if words(text[:e]) >= min_words]
        if whole_fits:
            options = [e for e in options if level_of(words(text[:e]), bins, levels) < whole]
        else:
            options = [e for e in options if fits(with_last(conv, text[:e].rstrip(), attribute, whole))]
            from_long += bool(options)
        for e in sorted(rng.sample(options, min(copies, len(options)))):
            short = text[:e].rstrip()
            level = level_of(words(short), bins, levels)
            out.append(with_last(conv, short, attribute, level, suffix=f"#cut{e}"))
            per_level[level] += 1
            made += 1
    stats = {"attribute": attribute, "copies": made, "relabeled": relabeled, "copies_per_level": per_level,
             "long_answers_cut_to_fit": from_long, "answers_that_fit": sum(fit.values()),
             "word_bins": [round(b, 1) for b in bins]}
    return out, stats


def with_last(conv: dict, content: str, attribute: str, level: int, suffix: str = "") -> dict:
    """A copy of `conv` whose last turn has `content` and attribute = level (other labels kept)."""
    last = conv["turns"][-1]
    labels = {**(last.get("labels") or {}), attribute: level}
    return {**conv, "id": f"{conv['id']}{suffix}", "turns": [*conv["turns"][:-1], {**last, "content": content,
                                                                                  "labels": labels}]}
