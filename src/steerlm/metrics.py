"""Reward-model evaluation: per-attribute regression metrics and pairwise preference accuracy.

Per attribute, over the held-out samples that annotate it:
  mse, mae, pearson, spearman, and `baseline_mse`: the MSE of predicting the *training* mean
  of that attribute for every sample. An RM that does not beat its baseline has learned nothing
  about that attribute.
Pairwise accuracy: the share of preference pairs whose chosen response gets the higher
scalarized reward w · ŷ (NeMo-Aligner's attribute_weights; ties count as wrong).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats


def _corr(fn, x: np.ndarray, y: np.ndarray) -> Optional[float]:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None  # undefined: constant predictions or constant labels
    return float(fn(x, y)[0])


def regression_metrics(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                       attributes: Sequence[str], train_mean: Mapping[str, float]) -> dict[str, dict]:
    """pred, labels: (N, K) floats; mask: (N, K) bool. -> {attribute: {n, mse, mae, ...}}."""
    out = {}
    for k, a in enumerate(attributes):
        m = mask[:, k].astype(bool)
        n = int(m.sum())
        if n == 0:
            continue
        p, y = pred[m, k].astype(np.float64), labels[m, k].astype(np.float64)
        base = train_mean.get(a)
        out[a] = {
            "n": n,
            "mse": float(np.mean((p - y) ** 2)),
            "mae": float(np.mean(np.abs(p - y))),
            "pearson": _corr(stats.pearsonr, p, y),
            "spearman": _corr(stats.spearmanr, p, y),
            "baseline_mse": None if base is None else float(np.mean((base - y) ** 2)),
        }
    return out


def pairwise_accuracy(r_chosen: np.ndarray, r_rejected: np.ndarray) -> Optional[float]:
    if len(r_chosen) == 0:
        return None
    return float(np.mean(np.asarray(r_chosen) > np.asarray(r_rejected)))


def beats_baseline(metrics: Mapping[str, dict]) -> list[str]:
    """Attributes whose held-out MSE is below the predict-the-train-mean baseline."""
    return [a for a, m in metrics.items() if m["baseline_mse"] is not None and m["mse"] < m["baseline_mse"]]


def format_table(metrics: Mapping[str, dict]) -> str:
    """A fixed-width table for stdout and the README."""
    head = f"{'attribute':<12} {'n':>5} {'mse':>7} {'base_mse':>8} {'mae':>6} {'pearson':>8} {'spearman':>8}"
    rows = [head, "-" * len(head)]
    f = lambda v: "    n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:7.3f}"
    for a, m in metrics.items():
        rows.append(f"{a:<12} {m['n']:>5} {f(m['mse'])} {f(m['baseline_mse']):>8} {m['mae']:6.3f} "
                    f"{f(m['pearson']):>8} {f(m['spearman']):>8}")
    return "\n".join(rows)
