"""Steerability statistics: bootstrap confidence intervals, the side-effect matrix, RM-free text measures,
quantile label calibration.

The evaluate stage answers every prompt p for each swept attribute a at each requested level l (the other
attributes at their defaults), S samples each. Every answer is then *measured* several ways.

Measure convention. Each sample is a dict with
    "attribute": the swept attribute a,   "level": the requested level l,   "prompt_id": the prompt,
    "measures":  {name: float | None}
and measure names carry a prefix saying who measured:
    "rm:<attribute>"  the reward model's score for that attribute ("rm:quality", "rm:humor", ...);
    "text:<measure>"  an RM-free measure of the answer text from `text_measures` ("text:words", ...).
`sample_measures(scores, text)` builds that dict from an RM score dict and the answer. A missing name or
a None value (e.g. the RM skipped an over-long answer) drops that sample from that measure only.

Intervals. A percentile bootstrap: the statistic on B resamples, the interval its (α/2, 1 − α/2) quantiles.
The S samples of one prompt are not independent (same question, same model, often near-identical answers),
so resampling rows treats N = P·S correlated rows as N independent ones and gives intervals that are too
narrow. With `clusters` (the prompt ids) whole prompts are resampled with replacement instead, so the
interval reflects how much the statistic depends on *which prompts* were asked (Field & Welsh 2007,
"Bootstrapping clustered data"). Resamples on which the statistic is undefined are dropped and counted.

Side effects (Chang et al., "A Course Correction in Steerability Evaluation", AAAI 2026): requesting a at
level l should move measured a and nothing else. Row a, column m of `side_effect_matrix` is the slope of
measure m on the requested level of a, over a's samples, with its interval; the diagonal cells are the
intended movement, the rest the side effects.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np

RM_PREFIX = "rm:"
TEXT_PREFIX = "text:"
STATS = ("spearman", "pearson", "slope")
_CHUNK_ELEMENTS = 1_000_000  # resamples per chunk x samples: bounds the (chunk, n) temporaries at ~8 MB each


# ===== bootstrap intervals =======================================================================
@dataclass(frozen=True)
class CI:
    """A point estimate with its bootstrap interval.

    value: the statistic on all data (None: undefined there, e.g. constant y for a correlation).
    lo, hi: the percentile interval (None when no resample gave a defined statistic).
    n: samples; n_clusters: resampled clusters (None: rows were resampled);
    n_boot_valid: resamples on which the statistic was defined (out of the requested n_boot).
    """
    value: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    n: int
    n_clusters: Optional[int]
    n_boot_valid: int

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled(self, factor: float) -> "CI":
        """The interval of (statistic × factor), factor > 0 (a rescaled slope keeps its percentiles)."""
        f = lambda v: None if v is None else v * factor
        return CI(f(self.value), f(self.lo), f(self.hi), self.n, self.n_clusters, self.n_boot_valid)


def _resample_weights(n: int, clusters: Optional[np.ndarray], n_boot: int,
                      rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Bootstrap resamples as weights: W[b, i] = how many times sample i is in resample b.

    A resample of rows (or of whole clusters) with replacement is the multiset of its draws, so every
    statistic below is computed as a weighted one on the original n samples; resamples of clusters
    then need no ragged arrays (their sizes differ when clusters do). Yields (chunk, n) float arrays."""
    if clusters is None:
        units, k = np.arange(n), n
    else:
        _, units = np.unique(clusters, return_inverse=True)
        k = int(units.max()) + 1
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n, k)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, k, size=(b, k))  # k units drawn with replacement, per resample
        counts = np.bincount((draws + k * np.arange(b)[:, None]).ravel(), minlength=b * k).reshape(b, k)
        yield counts[:, units].astype(np.float64)  # a sample inherits its cluster's draw count


def _weighted_ranks(v: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks) of v within each weighted resample.

    In resample b a value group g (all samples with one value) holds e_g = Σ_{i∈g} W[b, i] draws, and
    below_g draws of smaller values; its members hold ranks below_g + 1 .. below_g + e_g, mean
    below_g + (e_g + 1)/2 — scipy.stats.rankdata(method="average") of the expanded resample. One sort
    of v serves every resample: O(B·n)."""
    order = np.argsort(v, kind="stable")
    vs = v[order]
    first = np.r_[True, vs[1:] != vs[:-1]]          # sorted position starts a new value group
    ends = np.r_[np.flatnonzero(first)[1:], len(v)]  # exclusive end of each group in sorted order
    upto = np.cumsum(W[:, order], axis=1)[:, ends - 1]  # draws of values <= group value
    e = np.diff(upto, axis=1, prepend=0.0)
    group_rank = upto - e + (e + 1) / 2
    group = np.empty(len(v), dtype=np.intp)
    group[order] = np.cumsum(first) - 1
    return group_rank[:, group]


def _constant(v: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Per resample: all drawn samples have one value of v (exactly; no float tolerance needed)."""
    drawn = W > 0
    return np.where(drawn, v, np.inf).min(axis=1) == np.where(drawn, v, -np.inf).max(axis=1)


def _batch_stats(stats: Sequence[str], x: np.ndarray, y: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted statistics per resample (rows of W); NaN where undefined.

        x̄ = Σ w x / Σ w,   Sxy = Σ w (x − x̄)(y − ȳ)
        slope = Sxy / Sxx (OLS of y on x; undefined for constant x; 0 for constant y)
        pearson = Sxy / √(Sxx Syy) (undefined for constant x or y); spearman = pearson of average ranks
    """
    const_x, const_y = _constant(x, W), _constant(y, W)
    sw = W.sum(axis=1)

    def moments(a, b):
        da = a - (W * a).sum(axis=1, keepdims=True) / sw[:, None]
        db = b - (W * b).sum(axis=1, keepdims=True) / sw[:, None]
        return (W * da * db).sum(axis=1), (W * da * da).sum(axis=1), (W * db * db).sum(axis=1)

    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if "slope" in stats or "pearson" in stats:
            sxy, sxx, syy = moments(x[None, :], y[None, :])
            if "slope" in stats:
                out["slope"] = np.where(const_x, np.nan, sxy / sxx)
            if "pearson" in stats:
                out["pearson"] = np.where(const_x | const_y, np.nan, np.clip(sxy / np.sqrt(sxx * syy), -1, 1))
        if "spearman" in stats:
            sxy, sxx, syy = moments(_weighted_ranks(x, W), _weighted_ranks(y, W))
            out["spearman"] = np.where(const_x | const_y, np.nan, np.clip(sxy / np.sqrt(sxx * syy), -1, 1))
    return out


def _bootstrap(x, y, stats: Sequence[str], clusters=None, n_boot: int = 2000, seed: int = 0,
               level: float = 0.95) -> dict[str, CI]:
    """Several statistics on the same resamples (one weight matrix, one RNG stream)."""
    for s in stats:
        if s not in STATS:
            raise ValueError(f"stat {s!r}: expected one of {', '.join(STATS)}")
    if not 0 < level < 1:
        raise ValueError(f"level {level}: expected a coverage in (0, 1)")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if x.shape != (n,) or y.shape != (n,):
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (drop unmeasured samples first)")
    if clusters is not None:
        clusters = np.asarray(clusters)
        if clusters.shape != (n,):
            raise ValueError(f"clusters must have one label per sample ({n}), got shape {clusters.shape}")
    n_clusters = None if clusters is None else len(np.unique(clusters))
    if n == 0:
        return {s: CI(None, None, None, 0, n_clusters, 0) for s in stats}

    full = _batch_stats(stats, x, y, np.ones((1, n)))
    boots = {s: [] for s in stats}
    for W in _resample_weights(n, clusters, n_boot, np.random.default_rng(seed)):
        for s, v in _batch_stats(stats, x, y, W).items():
            boots[s].append(v)
    alpha = 1 - level
    out = {}
    for s in stats:
        min_n = 2 if s == "slope" else 3  # evaluate._slope / _corr: a correlation of 2 points is ±1 by construction
        value = float(full[s][0]) if n >= min_n and np.isfinite(full[s][0]) else None
        b = np.concatenate(boots[s]) if boots[s] else np.empty(0)  # n_boot=0: the point estimate alone
        b = b[np.isfinite(b)]
        if value is None or len(b) == 0:
            out[s] = CI(value, None, None, n, n_clusters, len(b))
            continue
        lo, hi = np.quantile(b, [alpha / 2, 1 - alpha / 2])
        out[s] = CI(value, float(lo), float(hi), n, n_clusters, len(b))
    return out


def bootstrap_ci(x, y, stat: str, clusters=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> CI:
    """Point estimate of `stat` ("spearman", "pearson" or "slope" = OLS of y on x) on all (x, y), and its
    percentile bootstrap interval at `level` from `n_boot` resamples.

    clusters: one label per sample (e.g. prompt ids): resample whole clusters, not rows — see the module
    docstring for why. Spearman uses average ranks for ties (requested levels are all ties), recomputed
    inside every resample. Deterministic given `seed`."""
    return _bootstrap(x, y, [stat], clusters, n_boot, seed, level)[stat]


def verdict(ci: CI) -> Optional[str]:
    """"follows": the interval is above 0; "reversed": below 0; "noise": it contains 0; None: undefined."""
    if ci.value is None or ci.lo is None:
        return None
    return "follows" if ci.lo > 0 else "reversed" if ci.hi < 0 else "noise"


def format_ci(ci: Union[CI, Mapping, None], digits: int = 2) -> str:
    """"0.53 [0.41, 0.64]"; "n/a" when undefined; "0.53 [n/a]" when no resample was defined."""
    if ci is None:
        return "n/a"
    c = ci if isinstance(ci, CI) else CI(**ci)
    if c.value is None:
        return "n/a"
    if c.lo is None:
        return f"{c.value:.{digits}f} [n/a]"
    return f"{c.value:.{digits}f} [{c.lo:.{digits}f}, {c.hi:.{digits}f}]"


# ===== side effects ==============================================================================
def side_effect_matrix(samples: Sequence[Mapping], requested: Sequence[str], measures: Sequence[str],
                       clusters_key: Optional[str] = "prompt_id", n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> dict[str, dict[str, dict]]:
    """How far each measure moves per requested level of each swept attribute.

    samples: [{"attribute", "level", clusters_key, "measures": {name: float | None}}] (module docstring).
    requested: the swept attributes (rows); measures: measure names (columns), e.g. "rm:humor", "text:words".
    clusters_key: the sample key whose value groups correlated samples (None: resample rows).

    -> {a: {m: cell}}, cell = {
        "n": samples of a that measure m,
        "slope": CI dict — OLS slope of m on the requested level of a (units of m per level);
        "std_slope": CI dict — slope / sd(m), sd over *all* samples measuring m (every swept attribute and
                     level, ddof 1), so columns in different units compare; value None when sd is 0;
        "spearman": CI dict — Spearman (requested level, m) over a's samples;
        "verdict": verdict of the slope interval ("follows" / "reversed" / "noise" / None)}.
    Slope and Spearman of one cell share their resamples; every cell uses `seed`."""
    pooled_sd = {}
    for m in measures:
        v = np.array([s["measures"][m] for s in samples if s["measures"].get(m) is not None], dtype=np.float64)
        pooled_sd[m] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    out: dict[str, dict[str, dict]] = {}
    for a in requested:
        rows = [s for s in samples if s["attribute"] == a]
        out[a] = {}
        for m in measures:
            have = [s for s in rows if s["measures"].get(m) is not None]
            if clusters_key is not None and any(clusters_key not in s for s in have):
                raise ValueError(f"side_effect_matrix: a sample of {a!r} has no {clusters_key!r} (clusters_key)")
            x = [s["level"] for s in have]
            y = [s["measures"][m] for s in have]
            cl = None if clusters_key is None else [s[clusters_key] for s in have]
            ci = _bootstrap(x, y, ("slope", "spearman"), cl, n_boot, seed, level)
            sd = pooled_sd[m]
            std = ci["slope"].scaled(1 / sd) if sd > 0 else CI(None, None, None, len(have), ci["slope"].n_clusters, 0)
            out[a][m] = {"n": len(have), "slope": ci["slope"].to_dict(), "std_slope": std.to_dict(),
                         "spearman": ci["spearman"].to_dict(), "verdict": verdict(ci["slope"])}
    return out


def format_side_effects(matrix: Mapping[str, Mapping[str, dict]], key: str = "std_slope", digits: int = 2) -> str:
    """A fixed-width table: one row per swept attribute, one column per measure, cells format_ci(cell[key])."""
    measures = list(next(iter(matrix.values()), {}))
    cells = {a: [format_ci(row[m][key], digits) for m in measures] for a, row in matrix.items()}
    width = max([len(m) for m in measures] + [len(c) for r in cells.values() for c in r] + [3])
    head = f"{'requested':<12} " + " ".join(f"{m:>{width}}" for m in measures)
    return "\n".join([head, "-" * len(head)] + [f"{a:<12} " + " ".join(f"{c:>{width}}" for c in r)
                                                for a, r in cells.items()])


# ===== RM-free text measures =====================================================================
# Pictographic emoji blocks (approximate: a ZWJ sequence such as a family counts each of its pictographs;
# skin-tone modifiers, variation selectors and ZWJ are not counted; a flag counts as 2 regional indicators).
_EMOJI = re.compile("[\U0001F300-\U0001F5FF\U0001F600-\U0001F64F\U0001F680-\U0001F6FF\U0001F900-\U0001F9FF"
                    "\U0001FA70-\U0001FAFF\U0001F1E6-\U0001F1FF\u2600-\u26FF\u2700-\u27BF]")
_LIST_LINE = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+\S", re.MULTILINE)  # "- x", "* x", "• x", "1. x", "2) x"

TEXT_MEASURES = ("words", "sentences", "characters", "syllables_per_word", "fk_grade", "reading_ease",
                 "exclamations_per_100w", "questions", "emojis", "list_lines")


@functools.lru_cache(maxsize=None)
def _pyphen_en():
    import pyphen  # a textstat dependency; its hyphenation dictionaries ship in the wheel
    return pyphen.Pyphen(lang="en_US")


@functools.lru_cache(maxsize=65536)
def _syllables(word: str) -> int:
    return len(_pyphen_en().positions(word)) + 1  # hyphenation points + 1, textstat's fallback rule


def text_measures(text: str) -> dict[str, float]:
    """RM-free measures of one answer (keys: TEXT_MEASURES, unprefixed; `sample_measures` adds "text:").

    words: whitespace-separated tokens after textstat.remove_punctuation (textstat.lexicon_count's rule);
    sentences, characters (non-space): textstat.sentence_count, textstat.char_count. Note textstat's
        sentence rule: a "sentence" of at most 2 words is not counted, and non-empty text has
        at least 1 sentence.
    syllables: pyphen hyphenation points + 1 per word — textstat's own fallback. textstat 0.7.13 looks
        English words up in NLTK's cmudict first, which it downloads on first use: that fails offline (and
        makes results depend on the machine), so the formulas are applied here to textstat's counts:
        fk_grade = 0.39 · words/sentences + 11.8 · syllables/words − 15.59     (Flesch–Kincaid grade)
        reading_ease = 206.835 − 1.015 · words/sentences − 84.6 · syllables/words   (Flesch)
    exclamations_per_100w = 100 · "!" count / words; questions: "?" count; emojis: pictographs (approx.);
    list_lines: lines starting with a bullet ("-", "*", "+", "•") or a number ("1.", "2)").
    Text without words: every word-based measure is 0.0 (as textstat's FK); counts are still counted."""
    import textstat

    counts = {"characters": float(textstat.char_count(text, ignore_spaces=True)) if text else 0.0,
              "questions": float(text.count("?")), "emojis": float(len(_EMOJI.findall(text))),
              "list_lines": float(len(_LIST_LINE.findall(text)))}
    words = textstat.remove_punctuation(text).lower().split() if text else []
    n = len(words)
    if n == 0:
        return {k: counts.get(k, 0.0) for k in TEXT_MEASURES}
    sentences = textstat.sentence_count(text)
    wps, spw = n / sentences, sum(_syllables(w) for w in words) / n
    out = {"words": float(n), "sentences": float(sentences), **counts, "syllables_per_word": spw,
           "fk_grade": 0.39 * wps + 11.8 * spw - 15.59, "reading_ease": 206.835 - 1.015 * wps - 84.6 * spw,
           "exclamations_per_100w": 100.0 * text.count("!") / n}
    return {k: out[k] for k in TEXT_MEASURES}


def sample_measures(scores: Optional[Mapping[str, float]], text: Optional[str]) -> dict[str, Optional[float]]:
    """The "measures" dict of one sample: {"rm:<a>": RM score} (none when scores is None) plus
    {"text:<m>": text_measures(text)[m]} (none when text is None)."""
    out = {} if scores is None else {f"{RM_PREFIX}{a}": (None if v is None else float(v)) for a, v in scores.items()}
    if text is not None:
        out.update({f"{TEXT_PREFIX}{k}": v for k, v in text_measures(text).items()})
    return out


# ===== quantile label calibration ================================================================
@dataclass(frozen=True)
class QuantileMap:
    """Monotone map from a continuous score to a discrete level.

    level(s) = levels[#{k : s ≥ thresholds[k]}]: thresholds[k] is the smallest fitting score that gets
    levels[k + 1] or above (+inf: no fitting score reached it; −inf: target fraction at or below level k
    is 0, so every score is above it). fractions: the target distribution over levels."""
    levels: tuple[float, ...]
    thresholds: tuple[float, ...]
    fractions: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-safe: infinite thresholds as the strings "inf" / "-inf" (JSON has no infinity)."""
        t = [v if math.isfinite(v) else ("inf" if v > 0 else "-inf") for v in self.thresholds]
        return {"levels": list(self.levels), "thresholds": t, "fractions": list(self.fractions)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantileMap":
        return cls(tuple(float(v) for v in d["levels"]), tuple(float(v) for v in d["thresholds"]),
                   tuple(float(v) for v in d["fractions"]))


def _target_fractions(target, levels: Sequence[float]) -> np.ndarray:
    """target: {level: count or fraction} (absent levels: 0) or a sequence aligned with levels."""
    if isinstance(target, Mapping):
        unknown = set(target) - set(levels)
        if unknown:
            raise ValueError(f"target has levels {sorted(unknown)} not in levels {list(levels)}")
        p = np.array([float(target.get(lev, 0.0)) for lev in levels])
    else:
        p = np.asarray(target, dtype=np.float64)
        if p.shape != (len(levels),):
            raise ValueError(f"target: {len(p)} values for {len(levels)} levels")
    if (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError(f"target must be non-negative with a positive sum, got {p.tolist()}")
    return p / p.sum()


def fit_quantile_map(scores, target, levels: Sequence[float] = (0, 1, 2, 3, 4)) -> QuantileMap:
    """Cut points that give `scores` the target level distribution.

    A score s with q(s) = #{scores < s} / N (the fraction of scores below it) gets the level k with
    F_{k−1} ≤ q(s) < F_k, F the target's cumulative distribution. Sorted distinct scores at positions
    i = 0..N−1 then fill level k with ceil(N F_k) − ceil(N F_{k−1}) scores: the target count N p_k within 1.
    Tied scores share q, hence a level. Threshold k is the smallest score with q ≥ F_k."""
    s = np.asarray(scores, dtype=np.float64)
    levels = tuple(float(v) for v in levels)
    if s.ndim != 1 or len(s) == 0 or not np.isfinite(s).all():
        raise ValueError("scores must be a non-empty 1-D array of finite values")
    if len(levels) < 2 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be at least two strictly increasing values, got {list(levels)}")
    p = _target_fractions(target, levels)
    cdf = np.cumsum(p)[:-1] - 1e-9  # tolerance: 0.1 + 0.2 must not land above 0.3 (N·F = 30.000000000000004)
    u = np.unique(s)
    q = np.searchsorted(np.sort(s), u, side="left") / len(s)  # fraction below each distinct score
    idx = np.searchsorted(q, cdf, side="left")  # first distinct score with q >= F_k
    thresholds = np.where(cdf <= 0, -np.inf, u[np.minimum(idx, len(u) - 1)])
    thresholds = np.where(idx >= len(u), np.inf, thresholds)
    return QuantileMap(levels, tuple(float(t) for t in thresholds), tuple(float(v) for v in p))


def apply_quantile_map(qmap: Union[QuantileMap, Mapping], scores) -> np.ndarray:
    """Levels (float array) of `scores` under a fitted map (a QuantileMap or its to_dict form)."""
    m = qmap if isinstance(qmap, QuantileMap) else QuantileMap.from_dict(qmap)
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    k = np.searchsorted(np.asarray(m.thresholds), s, side="right")  # #{k : s >= threshold_k}
    return np.asarray(m.levels)[k]


def quantile_calibrate(scores, target, levels: Sequence[float] = (0, 1, 2, 3, 4)) -> np.ndarray:
    """Map continuous scores (e.g. an RM that squeezes its predictions towards the middle of the scale)
    onto the target discrete level distribution, order-preserving; see fit_quantile_map."""
    return apply_quantile_map(fit_quantile_map(scores, target, levels), scores)
