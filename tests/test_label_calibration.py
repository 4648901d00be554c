"""Label calibration (steerlm.label_calibration): an RM's compressed scores spread onto a target distribution,
human labels left alone, label strings rewritten; plus the config checks."""

from __future__ import annotations

import numpy as np
import pytest

from steerlm.attributes import get_schema
from steerlm.errors import ConfigError
from steerlm.label_calibration import HUMAN, calibrate, targets

SCHEMA = get_schema("steerlm9")
LEVELS = SCHEMA.levels()


def rows_with_compressed_scores(n: int = 500, seed: int = 0) -> list[dict]:
    """What a weak RM writes: verbosity scores squeezed around 2 (rounded: nearly all 2), humor human-labeled on
    every other turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, v in enumerate(rng.normal(2.0, 0.25, n)):
        human = {"humor": float(k % 5)} if k % 2 else {}
        labels = {"verbosity": float(round(v)), "humor": human.get("humor", 1.0)}
        turn = {"role": "assistant", "content": "x", "labels": labels, "scores": {"verbosity": float(v), "humor": 0.9},
                "label": SCHEMA.format_label(labels)}
        if human:
            turn[HUMAN] = ["humor"]
        rows.append({"id": str(k), "turns": [{"role": "user", "content": "q", "labels": None}, turn]})
    return rows


def test_compressed_scores_take_the_target_distribution_in_rm_order():
    rows = rows_with_compressed_scores()
    before = [r["turns"][1]["labels"]["verbosity"] for r in rows]
    assert sum(v == 2.0 for v in before) > 0.9 * len(rows)  # the compression being fixed
    target = {"0": 10, "1": 20, "2": 40, "3": 20, "4": 10}
    rep = calibrate(rows, targets("quantile", ["verbosity"], {"verbosity": target}, {}, LEVELS), LEVELS,
                    SCHEMA.format_label)
    after = np.array([r["turns"][1]["labels"]["verbosity"] for r in rows])
    counts = [int((after == lv).sum()) for lv in LEVELS]
    assert counts == pytest.approx([50, 100, 200, 100, 50], abs=1)
    scores = np.array([r["turns"][1]["scores"]["verbosity"] for r in rows])
    order = np.argsort(scores)
    assert (np.diff(after[order]) >= 0).all()  # monotone in the RM score
    assert rep["verbosity"]["after"] == {f"{lv:g}": c for lv, c in zip(LEVELS, counts)}
    for r in rows:  # the label string follows the calibrated value
        t = r["turns"][1]
        assert t["label"] == SCHEMA.format_label(t["labels"]) and f"verbosity:{int(t['labels']['verbosity'])}" in t["label"]


def test_human_labels_are_never_calibrated_and_uniform_spreads_evenly():
    rows = rows_with_compressed_scores(400)
    human = {r["id"]: r["turns"][1]["labels"]["humor"] for r in rows if HUMAN in r["turns"][1]}
    calibrate(rows, targets("quantile", ["verbosity", "humor"], "uniform", {}, LEVELS), LEVELS, SCHEMA.format_label)
    for r in rows:
        t = r["turns"][1]
        if r["id"] in human:
            assert t["labels"]["humor"] == human[r["id"]]
    rm_humor = [r["turns"][1]["labels"]["humor"] for r in rows if r["id"] not in human]
    assert len(set(rm_humor)) == 1  # one tied score for every RM-written humor: ties share a level
    verbosity = np.array([r["turns"][1]["labels"]["verbosity"] for r in rows])
    assert [int((verbosity == lv).sum()) for lv in LEVELS] == [80] * 5


def test_targets_come_from_the_rm_card_and_bad_ones_are_one_line_errors():
    card = {"train_label_counts": {"verbosity": {"0": 2, "1": 8, "2": 31, "3": 11, "4": 0}}}
    assert targets("quantile", ["verbosity"], None, card, LEVELS)["verbosity"][4.0] == 0.0
    assert targets("none", ["verbosity"], None, card, LEVELS) == {}
    with pytest.raises(ConfigError, match="no target distribution for 'humor'"):
        targets("quantile", ["humor"], None, card, LEVELS)
    with pytest.raises(ConfigError, match="unknown 'rank'"):
        targets("rank", ["verbosity"], None, card, LEVELS)
    with pytest.raises(ConfigError, match="levels must be among"):
        targets("quantile", ["verbosity"], {"verbosity": {"7": 1}}, card, LEVELS)
