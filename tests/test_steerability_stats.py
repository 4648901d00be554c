"""Steerability statistics: bootstrap intervals against known populations, cluster resampling, the
side-effect matrix on synthetic sweeps with known slopes, text measures on fixed strings, quantile calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from steerlm.steerability import (CI, TEXT_MEASURES, QuantileMap, _batch_stats, apply_quantile_map, bootstrap_ci,
                                  fit_quantile_map, format_ci, format_side_effects, quantile_calibrate,
                                  sample_measures, side_effect_matrix, text_measures, verdict)


# ===== bootstrap intervals =======================================================================
def test_weighted_statistics_equal_scipy_on_the_expanded_resample():
    """A resample as weights (W[i] = copies of sample i) must give what scipy gives on the copies:
    Spearman with average ranks over ties (levels are all ties; resampling adds more), Pearson, OLS slope."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, 40).astype(float)
    y = np.round(rng.normal(size=40), 1)  # ties in y too
    W = rng.integers(0, 3, (6, 40)).astype(float)
    got = _batch_stats(("spearman", "pearson", "slope"), x, y, W)
    for b in range(len(W)):
        idx = np.repeat(np.arange(40), W[b].astype(int))
        assert got["spearman"][b] == pytest.approx(stats.spearmanr(x[idx], y[idx])[0], abs=1e-12)
        assert got["pearson"][b] == pytest.approx(stats.pearsonr(x[idx], y[idx])[0], abs=1e-12)
        assert got["slope"][b] == pytest.approx(stats.linregress(x[idx], y[idx]).slope, abs=1e-12)


def test_spearman_interval_contains_the_population_value():
    """Bivariate normal with ρ = 0.6: population Spearman = (6/π)·asin(ρ/2) = 0.5819. n = 300."""
    rho = 0.6
    xy = np.random.default_rng(0).multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=300)
    ci = bootstrap_ci(xy[:, 0], xy[:, 1], "spearman")
    assert ci.value == pytest.approx(stats.spearmanr(xy[:, 0], xy[:, 1])[0])
    assert ci.lo < 6 / math.pi * math.asin(rho / 2) < ci.hi
    assert ci.lo > 0 and verdict(ci) == "follows"
    assert (ci.n, ci.n_clusters, ci.n_boot_valid) == (300, None, 2000)
    assert 0.05 < ci.hi - ci.lo < 0.3  # not degenerate, not absurdly wide


def test_interval_covers_zero_about_95_percent_for_independent_data():
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(200):
        x, y = rng.normal(size=40), rng.normal(size=40)
        ci = bootstrap_ci(x, y, "spearman", n_boot=300, seed=rep)
        covered += ci.lo <= 0 <= ci.hi
    assert 0.88 <= covered / 200 <= 0.99


def test_seed_makes_it_deterministic_and_level_widens():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=100), rng.normal(size=100)
    assert bootstrap_ci(x, y, "pearson", seed=5) == bootstrap_ci(x, y, "pearson", seed=5)
    c90, c99 = bootstrap_ci(x, y, "pearson", level=0.90), bootstrap_ci(x, y, "pearson", level=0.99)
    assert c99.lo < c90.lo and c99.hi > c90.hi


def test_cluster_bootstrap_is_wider_for_correlated_clusters():
    """10 prompts x 30 near-duplicate answers: 300 rows but only 10 independent observations.
    Resampling rows pretends n = 300; resampling prompts sees the 10 — a much wider interval."""
    rng = np.random.default_rng(4)
    xc = rng.normal(size=10)
    yc = 0.5 * xc + rng.normal(size=10)
    cl = np.repeat(np.arange(10), 30)
    x, y = xc[cl] + 0.01 * rng.normal(size=300), yc[cl] + 0.01 * rng.normal(size=300)
    for stat in ("spearman", "slope"):
        rows = bootstrap_ci(x, y, stat)
        clustered = bootstrap_ci(x, y, stat, clusters=cl)
        assert clustered.value == rows.value  # the point estimate is on all data either way
        assert clustered.n_clusters == 10 and rows.n_clusters is None
        assert clustered.hi - clustered.lo > 2 * (rows.hi - rows.lo)


def test_one_sample_per_cluster_is_the_row_bootstrap():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=50), rng.normal(size=50)
    a, b = bootstrap_ci(x, y, "slope"), bootstrap_ci(x, y, "slope", clusters=np.arange(50))
    assert (a.value, a.lo, a.hi) == (b.value, b.lo, b.hi)


def test_undefined_statistics():
    x = np.arange(10.0)
    for stat in ("spearman", "pearson"):
        ci = bootstrap_ci(x, np.full(10, 3.0), stat)  # constant y: a correlation is undefined
        assert (ci.value, ci.lo, ci.hi, ci.n_boot_valid) == (None, None, None, 0)
        assert verdict(ci) is None and format_ci(ci) == "n/a"
    flat = bootstrap_ci(x, np.full(10, 3.0), "slope")  # ... but y does not move: slope 0
    assert (flat.value, flat.lo, flat.hi) == (0.0, 0.0, 0.0) and verdict(flat) == "noise"
    assert bootstrap_ci(np.ones(10), x, "slope").value is None  # constant x
    assert bootstrap_ci([1.0, 2.0], [1.0, 3.0], "spearman").value is None  # two points: ±1 by construction
    assert bootstrap_ci([], [], "pearson").value is None
    # one x differs: resamples that miss it have constant x and are dropped, and counted
    rng = np.random.default_rng(6)
    ci = bootstrap_ci(np.r_[np.zeros(9), 1.0], rng.normal(size=10), "pearson", n_boot=1000)
    assert ci.value is not None and 500 < ci.n_boot_valid < 800  # P(miss) = 0.9^10 = 0.35


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="stat"):
        bootstrap_ci([1, 2, 3], [1, 2, 3], "kendall")
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([1, 2, 3], [1, float("nan"), 3], "slope")
    with pytest.raises(ValueError, match="clusters"):
        bootstrap_ci([1, 2, 3], [1, 2, 3], "slope", clusters=[0, 1])


def test_verdict_and_format():
    assert verdict(CI(0.5, 0.1, 0.9, 10, None, 100)) == "follows"
    assert verdict(CI(-0.5, -0.9, -0.1, 10, None, 100)) == "reversed"
    assert verdict(CI(0.1, -0.2, 0.4, 10, None, 100)) == "noise"
    assert format_ci(CI(0.531, 0.409, 0.6449, 10, None, 100)) == "0.53 [0.41, 0.64]"
    assert format_ci(CI(0.531, 0.409, 0.6449, 10, None, 100).to_dict(), digits=1) == "0.5 [0.4, 0.6]"
    assert format_ci(CI(0.531, None, None, 10, None, 0)) == "0.53 [n/a]"


# ===== side effects ==============================================================================
def sweep(seed=0, n_prompts=20, per_level=3):
    """Requested verbosity moves words by +20/level and nothing else; requested humor moves exclamations by
    +0.5/level and RM humor by +0.8/level. FK grade moves for neither. Prompts shift every measure (clustered)."""
    rng = np.random.default_rng(seed)
    prompt_words, prompt_fk = rng.normal(0, 30, n_prompts), rng.normal(0, 2, n_prompts)
    samples = []
    for a in ("verbosity", "humor"):
        for level in range(5):
            for p in range(n_prompts):
                for _ in range(per_level):
                    samples.append({"attribute": a, "level": level, "prompt_id": f"p{p}", "measures": {
                        "text:words": 150 + prompt_words[p] + (20 * level if a == "verbosity" else 0) + rng.normal(0, 10),
                        "text:fk_grade": 9 + prompt_fk[p] + rng.normal(0, 1),
                        "text:exclamations_per_100w": (0.5 * level if a == "humor" else 0) + abs(rng.normal(0, 0.3)),
                        "rm:humor": 1 + (0.8 * level if a == "humor" else 0) + rng.normal(0, 0.5)}})
    return samples


TRUE_SLOPE = {("verbosity", "text:words"): 20.0, ("humor", "text:exclamations_per_100w"): 0.5, ("humor", "rm:humor"): 0.8}


def test_side_effect_matrix_recovers_known_slopes():
    """13 interval checks (8 slopes, 5 zero-cell Spearmans): at 95% a fair share of seeds would miss one by
    chance (40% of seeds 0..29 did), so the intervals here are 99% ones (3 of 30 seeds miss one); seed fixed."""
    samples = sweep()
    samples[0]["measures"]["rm:humor"] = None  # unmeasured (RM skipped it): dropped from that cell only
    measures = ["text:words", "text:fk_grade", "text:exclamations_per_100w", "rm:humor"]
    m = side_effect_matrix(samples, ["verbosity", "humor"], measures, level=0.99)
    assert set(m) == {"verbosity", "humor"} and all(list(row) == measures for row in m.values())
    for a, row in m.items():
        for name, cell in row.items():
            true = TRUE_SLOPE.get((a, name), 0.0)
            s = cell["slope"]
            assert s["lo"] <= true <= s["hi"], (a, name, s)
            assert s["n_clusters"] == 20
            assert cell["verdict"] == ("follows" if true > 0 else "noise"), (a, name, s)
            if true > 0:
                assert cell["spearman"]["lo"] > 0
            else:
                assert cell["spearman"]["lo"] <= 0 <= cell["spearman"]["hi"]
    assert m["verbosity"]["rm:humor"]["n"] == 299 and m["verbosity"]["text:words"]["n"] == 300
    # standardized slope: slope / sd of the measure over all 600 samples (both sweeps)
    sd = np.std([s["measures"]["text:words"] for s in samples], ddof=1)
    cell = m["verbosity"]["text:words"]
    for k in ("value", "lo", "hi"):
        assert cell["std_slope"][k] == pytest.approx(cell["slope"][k] / sd)
    json.dumps(m)  # the report goes into steerability.json
    table = format_side_effects(m)
    assert table.splitlines()[0].split()[1:] == measures and "verbosity" in table


def test_side_effect_matrix_cluster_key():
    samples = sweep(n_prompts=8)
    for s in samples:
        del s["prompt_id"]
    with pytest.raises(ValueError, match="prompt_id"):
        side_effect_matrix(samples, ["humor"], ["rm:humor"], n_boot=50)
    rows = side_effect_matrix(samples, ["humor"], ["rm:humor"], clusters_key=None, n_boot=50)
    assert rows["humor"]["rm:humor"]["slope"]["n_clusters"] is None


def test_side_effect_matrix_constant_measure():
    """A measure that never moves (no emoji anywhere): slope 0, correlations undefined, std_slope undefined."""
    samples = sweep(n_prompts=5)
    for s in samples:
        s["measures"]["text:emojis"] = 0.0
    cell = side_effect_matrix(samples, ["humor"], ["text:emojis"], n_boot=100)["humor"]["text:emojis"]
    assert cell["slope"]["value"] == 0.0 and cell["spearman"]["value"] is None and cell["std_slope"]["value"] is None


# ===== text measures =============================================================================
def test_text_measures_counts():
    t = text_measures("The cat sat on the mat. The dog ate the bone. A bird sang a song.")
    assert (t["words"], t["sentences"], t["exclamations_per_100w"], t["questions"]) == (16, 3, 0, 0)
    assert t["characters"] == len("Thecatsatonthemat.Thedogatethebone.Abirdsangasong.")  # letters and punctuation, no spaces
    t = text_measures("Wow, this is really great! I love it so much! Is it fun?")
    assert (t["words"], t["sentences"], t["questions"]) == (13, 3, 1)
    assert t["exclamations_per_100w"] == pytest.approx(100 * 2 / 13)
    t = text_measures("Steps 😂🎉:\n- first step here\n* second\n1. third\n2) fourth\nnot - a list")
    assert (t["emojis"], t["list_lines"]) == (2, 4)


def test_text_measures_readability():
    simple = text_measures("The cat sat.")
    # 3 words, 1 sentence, 3 syllables: FK = 0.39·3 + 11.8·1 − 15.59
    assert simple["fk_grade"] == pytest.approx(0.39 * 3 + 11.8 - 15.59)
    assert simple["reading_ease"] == pytest.approx(206.835 - 1.015 * 3 - 84.6)
    hard = text_measures("Epistemological considerations notwithstanding, the institutional implementation of "
                         "comprehensive regulatory frameworks necessitates interdisciplinary collaboration.")
    assert hard["fk_grade"] > simple["fk_grade"] + 10
    assert hard["reading_ease"] < simple["reading_ease"]


def test_text_measures_empty_and_prefixed():
    for text in ("", "   ", "!!!"):
        t = text_measures(text)
        assert list(t) == list(TEXT_MEASURES)
        assert t["words"] == 0 and t["fk_grade"] == 0 and t["exclamations_per_100w"] == 0
    m = sample_measures({"humor": 2.5, "quality": None}, "The cat sat.")
    assert m["rm:humor"] == 2.5 and m["rm:quality"] is None and m["text:words"] == 3
    assert set(m) == {"rm:humor", "rm:quality"} | {f"text:{k}" for k in TEXT_MEASURES}
    assert sample_measures(None, None) == {}


# ===== quantile calibration ======================================================================
TARGET = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.25, 4: 0.15}


def test_quantile_calibration_reproduces_the_target():
    """An RM squeezed to the middle (normal(2, 0.3)) spread back onto the label distribution."""
    scores = np.clip(np.random.default_rng(7).normal(2, 0.3, 997), 0, 4)
    levels = quantile_calibrate(scores, TARGET)
    counts = np.bincount(levels.astype(int), minlength=5)
    for k, f in TARGET.items():
        assert abs(counts[k] - f * len(scores)) <= 1, (k, counts)
    order = np.argsort(scores)
    assert (np.diff(levels[order]) >= 0).all()  # monotone
    # counts, not fractions, work the same
    assert (quantile_calibrate(scores, [10, 20, 30, 25, 15]) == levels).all()
    exact = quantile_calibrate(np.arange(100.0), TARGET)
    assert np.bincount(exact.astype(int)).tolist() == [10, 20, 30, 25, 15]


def test_quantile_calibration_keeps_ties_together():
    scores = np.round(np.random.default_rng(8).normal(2, 0.3, 500), 1)  # few distinct values
    levels = quantile_calibrate(scores, TARGET)
    for v in np.unique(scores):
        assert len(np.unique(levels[scores == v])) == 1
    order = np.argsort(scores)
    assert (np.diff(levels[order]) >= 0).all()


def test_quantile_map_applies_to_new_scores_and_serialises():
    rng = np.random.default_rng(9)
    fit = rng.normal(2, 0.3, 400)
    qmap = fit_quantile_map(fit, TARGET)
    assert len(qmap.thresholds) == 4 and list(qmap.thresholds) == sorted(qmap.thresholds)
    assert (apply_quantile_map(qmap, fit) == quantile_calibrate(fit, TARGET)).all()
    restored = json.loads(json.dumps(qmap.to_dict()))
    new = rng.normal(2, 0.5, 300)
    assert (apply_quantile_map(restored, new) == apply_quantile_map(qmap, new)).all()
    out = apply_quantile_map(qmap, np.sort(new))
    assert (np.diff(out) >= 0).all() and out.min() == 0 and out.max() == 4


def test_quantile_map_edge_levels():
    """A target level with no mass: never assigned, its threshold infinite (as a JSON string)."""
    qmap = fit_quantile_map(np.arange(10.0), {1: 0.5, 2: 0.5}, levels=(0, 1, 2, 3))
    assert qmap.thresholds[0] == -math.inf and qmap.thresholds[2] == math.inf
    d = qmap.to_dict()
    assert d["thresholds"][0] == "-inf" and d["thresholds"][2] == "inf"
    assert QuantileMap.from_dict(json.loads(json.dumps(d))) == qmap
    assert apply_quantile_map(qmap, [-100.0, 100.0]).tolist() == [1.0, 2.0]
    assert np.bincount(quantile_calibrate(np.arange(10.0), [0, 1, 1, 0], levels=(0, 1, 2, 3)).astype(int)).tolist() == [0, 5, 5]
    with pytest.raises(ValueError, match="not in levels"):
        fit_quantile_map([1.0, 2.0], {7: 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        fit_quantile_map([1.0, 2.0], [1, -1, 0, 0, 0])
