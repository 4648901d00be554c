"""RM evaluation metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from steerlm.metrics import beats_baseline, format_table, pairwise_accuracy, regression_metrics

M = -100.0


def example():
    """4 samples x 3 attributes:
    a: all 4 present; b: 3 present (sample 2 masked, with absurd values); c: never annotated."""
    pred = np.array([[1.0, 0.0, 9.0],
                     [2.0, 1.0, 9.0],
                     [3.0, 99.0, 9.0],
                     [4.0, 2.0, 9.0]])
    labels = np.array([[1.0, 2.0, M],
                       [3.0, 2.0, M],
                       [2.0, M, M],
                       [4.0, 2.0, M]])
    return pred, labels, labels != M


def test_regression_metrics_by_hand():
    """attribute a: p = (1, 2, 3, 4), y = (1, 3, 2, 4), train mean 2
        p − y = (0, −1, 1, 0): mse = 2/4 = 0.5, mae = 2/4 = 0.5
        pearson: p − p̄ = (−1.5, −.5, .5, 1.5), y − ȳ = (−1.5, .5, −.5, 1.5)
                 Σ = 2.25 − .25 − .25 + 2.25 = 4; Σ(p − p̄)² = Σ(y − ȳ)² = 5 -> r = 4/5 = 0.8
        spearman: the values are their own ranks -> 0.8
        baseline: (2 − y)² = (1, 1, 0, 4) -> 6/4 = 1.5
    attribute b: p = (0, 1, 2), y = (2, 2, 2) (sample 2 masked)
        p − y = (−2, −1, 0): mse = 5/3, mae = 3/3 = 1; constant labels -> correlations undefined (None)
        no train mean -> baseline None
    attribute c: never annotated -> absent
    """
    pred, labels, mask = example()
    out = regression_metrics(pred, labels, mask, ["a", "b", "c"], {"a": 2.0, "c": 1.0})
    assert set(out) == {"a", "b"}
    a, b = out["a"], out["b"]
    assert a["n"] == 4 and b["n"] == 3
    assert a["mse"] == pytest.approx(0.5) and a["mae"] == pytest.approx(0.5)
    assert a["pearson"] == pytest.approx(0.8) and a["spearman"] == pytest.approx(0.8)
    assert a["baseline_mse"] == pytest.approx(1.5)
    assert b["mse"] == pytest.approx(5 / 3) and b["mae"] == pytest.approx(1.0)
    assert b["pearson"] is None and b["spearman"] is None and b["baseline_mse"] is None
    # the numbers agree with numpy / scipy on the same entries
    assert a["pearson"] == pytest.approx(np.corrcoef(pred[:, 0], labels[:, 0])[0, 1])
    assert a["spearman"] == pytest.approx(stats.spearmanr(pred[:, 0], labels[:, 0])[0])
    assert all(isinstance(v, (int, float)) for v in a.values())  # JSON-serialisable, no numpy scalars


def test_random_data_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    pred = rng.normal(2, 1, size=(50, 2))
    labels = rng.integers(0, 5, size=(50, 2)).astype(float)
    mask = rng.random((50, 2)) > 0.3
    out = regression_metrics(pred, labels, mask, ["x", "y"], {"x": 2.2, "y": 1.0})
    for k, name in enumerate(["x", "y"]):
        m = mask[:, k]
        p, y = pred[m, k], labels[m, k]
        assert out[name]["n"] == m.sum()
        assert out[name]["mse"] == pytest.approx(np.mean((p - y) ** 2))
        assert out[name]["mae"] == pytest.approx(np.mean(np.abs(p - y)))
        assert out[name]["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
        assert out[name]["spearman"] == pytest.approx(stats.spearmanr(p, y)[0])
        base = {"x": 2.2, "y": 1.0}[name]
        assert out[name]["baseline_mse"] == pytest.approx(np.mean((base - y) ** 2))


def test_correlations_are_none_for_constant_predictions_or_too_few_samples():
    pred = np.array([[2.0, 1.0], [2.0, 2.0], [2.0, 0.0]])
    labels = np.array([[0.0, 1.0], [1.0, 3.0], [4.0, M]])
    out = regression_metrics(pred, labels, labels != M, ["const_pred", "two"], {})
    assert out["const_pred"]["pearson"] is None and out["const_pred"]["spearman"] is None
    assert out["const_pred"]["mse"] == pytest.approx((4 + 1 + 4) / 3)
    assert out["two"]["n"] == 2 and out["two"]["pearson"] is None  # fewer than 3 samples


def test_pairwise_accuracy_counts_ties_as_wrong():
    """chosen vs rejected: 3>1 right, 1=1 tie (wrong), 2<3 wrong, 5>4 right -> 2/4 = 0.5"""
    assert pairwise_accuracy(np.array([3.0, 1.0, 2.0, 5.0]), np.array([1.0, 1.0, 3.0, 4.0])) == 0.5
    assert pairwise_accuracy(np.array([1.0]), np.array([1.0])) == 0.0
    assert pairwise_accuracy([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == 1.0
    assert pairwise_accuracy(np.array([]), np.array([])) is None


def test_beats_baseline_is_strict_and_skips_missing_baselines():
    metrics = {"good": {"mse": 0.5, "baseline_mse": 1.5}, "equal": {"mse": 1.0, "baseline_mse": 1.0},
               "worse": {"mse": 2.0, "baseline_mse": 1.0}, "no_base": {"mse": 0.0, "baseline_mse": None}}
    assert beats_baseline(metrics) == ["good"]


def test_format_table_prints_na_for_undefined_values():
    pred, labels, mask = example()
    table = format_table(regression_metrics(pred, labels, mask, ["a", "b", "c"], {"a": 2.0}))
    lines = table.splitlines()
    assert lines[0].split() == ["attribute", "n", "mse", "base_mse", "mae", "pearson", "spearman"]
    row_a = next(line for line in lines if line.startswith("a "))
    row_b = next(line for line in lines if line.startswith("b "))
    assert row_a.split() == ["a", "4", "0.500", "1.500", "0.500", "0.800", "0.800"]
    assert row_b.split()[:3] == ["b", "3", "1.667"] and row_b.count("n/a") == 3
    assert not math.isnan(float(row_a.split()[2]))
