"""Label calibration: spread an RM's compressed scores over the scale before they become SFT labels.

NeMo-Aligner's annotator clips each RM score to the scale and rounds it. A strong RM spreads its predictions
over the scale; a weak one regresses to the mean, so rounding puts nearly every response at the middle levels
(measured on the default pipeline: verbosity {1: 208, 2: 503, 3: 13}, nothing at 0 or 4). The attribute string
then carries almost no information and AC-SFT learns to ignore it.

`method: quantile` keeps the RM's *ranking* and replaces its *scale*: per attribute, the labeled turns' scores
are mapped onto a target level distribution by quantiles (`steerability.fit_quantile_map`): the fraction q of
labeled scores below a score picks the level whose cumulative target probability first exceeds q. The
default target of an attribute is the distribution of the human labels the RM was trained on
(`train_label_counts` in its `steerlm_reward.json`), so the labels look like the human ones in
distribution and like the RM in order. `target: uniform` puts every level equally often instead: the
label is then the attribute's quintile within the dataset, the most a 5-level string can tell the policy. Only values the RM wrote are calibrated: human labels kept by
`keep_human_labels` stay as they are.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from .errors import ConfigError
from .steerability import QuantileMap, apply_quantile_map, fit_quantile_map

METHODS = ("none", "quantile")
HUMAN = "human_labels"  # per turn: the attributes whose values are human (kept), not the RM's


def targets(method: str, attributes: Sequence[str], target: Optional[Mapping], rm_card: Mapping,
            levels: Sequence[float]) -> dict[str, dict]:
    """{attribute: {level: count or fraction}} per RM-written attribute; {} for method none."""
    if method not in METHODS:
        raise ConfigError(f"calibration.method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return {}
    counts = rm_card.get("train_label_counts") or {}
    if target == "uniform":  # every level equally often: the most information a label string can carry
        return {a: {float(v): 1.0 for v in levels} for a in attributes}
    if target is not None and not isinstance(target, Mapping):
        raise ConfigError(f"calibration.target: null, uniform or {{attribute: {{level: count}}}}, got {target!r}")
    out = {}
    for a in attributes:
        t = (target or {}).get(a, counts.get(a))
        if t is None:
            raise ConfigError(f"calibration.target: no target distribution for {a!r} (the RM card has no "
                              f"train_label_counts for it; retrain the RM or give calibration.target.{a})")
        t = {float(k): float(v) for k, v in dict(t).items()}
        if set(t) - set(float(v) for v in levels) or sum(t.values()) <= 0:
            raise ConfigError(f"calibration.target.{a}: levels must be among {list(levels)} with a positive sum, got {t}")
        out[a] = t
    return out


def calibrate(rows: list[dict], targets_by_attr: Mapping[str, Mapping], levels: Sequence[float],
              format_label) -> dict:
    """Rewrite, in place, the RM-written labels of `rows` (canonical conversations from the label stage) by
    quantile maps fitted on those same scores. Returns {attribute: {map, before, after}} for the summary."""
    report = {}
    for a, target in targets_by_attr.items():
        turns = [t for r in rows for t in r["turns"] if t.get("scores") and a in t["scores"]
                 and a not in (t.get(HUMAN) or ())]
        if not turns:
            continue
        scores = [t["scores"][a] for t in turns]
        qmap: QuantileMap = fit_quantile_map(scores, target, levels)
        before = _counts([t["labels"][a] for t in turns], levels)
        for t, v in zip(turns, apply_quantile_map(qmap, scores)):
            t["labels"][a] = float(v)
        report[a] = {"map": qmap.to_dict(), "before": before, "after": _counts([t["labels"][a] for t in turns], levels)}
    for r in rows:  # the label strings follow the calibrated values
        for t in r["turns"]:
            if t.get("labels") and t.get("scores"):
                t["label"] = format_label(t["labels"])
    return report


def _counts(values, levels) -> dict[str, int]:
    return {f"{lv:g}": sum(1 for v in values if v == lv) for lv in levels}
