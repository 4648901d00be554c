"""A steerability sweep's statistics: does the measured attribute follow the requested level, and what else moves?

Samples come from one method (AC-SFT attribute strings, prompting, activation steering) answering the same
prompts at every requested level l of each swept attribute a, several sampled answers per (prompt, level).
Each sample carries `measures` (`steerability.sample_measures`: "rm:<attribute>" RM scores, "text:<measure>"
RM-free text measures) and its length in tokens. Per attribute:

- `spearman` / `rm_ci`: Spearman(l, RM-measured a) with a 95% bootstrap interval, resampling prompts (answers to one prompt are
  correlated: a row bootstrap would make the interval too narrow). The headline number.
- `length_spearman` / `length_ci`: Spearman(l, response tokens), the RM-free check (the one that matters for verbosity).
- `verdict`: "follows" when the `rm_ci` interval excludes 0 on the positive side, "noise" when it contains 0.
- per level: mean RM score with its standard error, mean tokens.
- `side_effects`: `steerability.side_effect_matrix` over every measure (Chang et al., AAAI 2026: when a is
  requested at level l, how far does every other measured attribute move?), standardized slopes with intervals.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .steerability import bootstrap_ci, side_effect_matrix, verdict

TEXT_COLUMNS = ("text:words", "text:fk_grade", "text:exclamations_per_100w", "text:emojis", "text:list_lines")


def _mean_sem(v: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    if len(v) == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def attribute_stats(samples: Sequence[dict], attribute: str, levels: Sequence[int], *, n_boot: int = 2000,
                    seed: int = 0) -> dict:
    rows = [s for s in samples if s["attribute"] == attribute]
    key = f"rm:{attribute}"
    scored = [s for s in rows if s["measures"].get(key) is not None]
    x = np.array([s["level"] for s in scored], dtype=np.float64)
    y = np.array([s["measures"][key] for s in scored], dtype=np.float64)
    xl = np.array([s["level"] for s in rows], dtype=np.float64)
    length = np.array([s["tokens"] for s in rows], dtype=np.float64)
    cl, cl_all = [s.get("prompt_id", k) for k, s in enumerate(scored)], [s.get("prompt_id", k) for k, s in enumerate(rows)]
    rm = bootstrap_ci(x, y, "spearman", clusters=cl, n_boot=n_boot, seed=seed)
    ln = bootstrap_ci(xl, length, "spearman", clusters=cl_all, n_boot=n_boot, seed=seed)
    slope = bootstrap_ci(x, y, "slope", clusters=cl, n_boot=n_boot, seed=seed)
    pearson = bootstrap_ci(x, y, "pearson", clusters=cl, n_boot=0, seed=seed)
    per_level = {"measured_mean": [], "measured_sem": [], "length_mean": [], "length_sem": [], "n_per_level": []}
    for lev in levels:
        m, e = _mean_sem(y[x == lev])
        lm, le = _mean_sem(length[xl == lev])
        for k, v in zip(per_level, (m, e, lm, le, int((xl == lev).sum()))):
            per_level[k].append(v)
    return {"n": len(rows), "n_scored": len(scored), "n_prompts": len(set(cl_all)),
            "spearman": rm.value, "pearson": pearson.value, "slope": slope.value, "length_spearman": ln.value,
            "rm_ci": rm.to_dict(), "length_ci": ln.to_dict(), "slope_ci": slope.to_dict(),
            "verdict": verdict(rm), "length_verdict": verdict(ln),
            "stopped_fraction": float(np.mean([s["stopped"] for s in rows])) if rows else None,
            "levels": list(levels), **per_level}


def method_stats(samples: Sequence[dict], attributes: Sequence[str], levels: Sequence[int], measures: Sequence[str],
                 *, n_boot: int = 2000, seed: int = 0) -> dict:
    """{"attributes": {a: attribute_stats}, "side_effects": {a: {measure: cell}}} for one method's samples."""
    return {"attributes": {a: attribute_stats(samples, a, levels, n_boot=n_boot, seed=seed) for a in attributes},
            "side_effects": side_effect_matrix([{**s, "measures": {**s["measures"], "tokens": float(s["tokens"])}}
                                                for s in samples], attributes, ["tokens", *measures],
                                               n_boot=n_boot, seed=seed)}


def worst_side_effect(side_effects: dict, attribute: str) -> Optional[tuple[str, float]]:
    """The other RM attribute that moves most (|standardized slope|, interval excluding 0) when `attribute` is
    swept: (measure, std slope), or None when nothing else moves beyond its noise."""
    worst = None
    for m, cell in side_effects.get(attribute, {}).items():
        s = cell["std_slope"]
        if not m.startswith("rm:") or m == f"rm:{attribute}" or s["value"] is None or cell["verdict"] == "noise":
            continue
        if worst is None or abs(s["value"]) > abs(worst[1]):
            worst = (m, s["value"])
    return worst
