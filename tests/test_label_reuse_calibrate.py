"""Stage 2 through the real CLI: scoring from the reward stage's stored features (a frozen-backbone RM) gives the
same labels as a forward; `attributes` limits what the RM writes; `calibration` spreads its labels while human
labels stay; a cache from another RM is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_recipe
from steerlm.attributes import BUILTIN_SCHEMAS
from steerlm.steerability import apply_quantile_map

STEERLM9 = BUILTIN_SCHEMAS["steerlm9"]

OASST = "data/oasst1/oasst1_validation_en.messages.jsonl.gz"
INPUT = f"input=[{{format: oasst, path: {OASST}, max_rows: 120}}]"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assistant_turns(path: Path) -> dict:
    return {(r["id"], k): t for r in read_jsonl(path) for k, t in enumerate(r["turns"]) if t["role"] == "assistant"}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("label_reuse")
    rm_args = [f"model.path={tiny_model_dir}", "model.freeze_backbone=true", "engine.precision=fp32",
               "train.epochs=3", "train.save_every=0", "eval.val_fraction=0.2", "max_length=1024",
               f"data.train=[{{format: helpsteer2, path: data/helpsteer2/helpsteer2_train_first100.jsonl}}, "
               f"{{format: oasst, path: {OASST}, max_rows: 120}}]"]
    run_recipe("train_reward", *rm_args, f"run_dir={base / 'rm'}")
    rm = base / "rm" / "model"
    common = [f"rm={rm}", INPUT, "max_length=1024", "keep_human_labels=true", "engine.precision=fp32"]
    out = {"rm": rm, "base": base}
    for name, extra in {"forward": [], "cached": [f"reuse_features={base / 'rm' / 'cache'}"],
                        "calibrated": ["reuse_features=auto", "'attributes=[verbosity,quality]'",  # auto: rm/cache
                                       "calibration.method=quantile", "calibration.target=uniform"]}.items():
        run_recipe("label", *common, *[e.strip("'") for e in extra], f"output_dir={base / name}")
        out[name] = base / name
    return out


def test_stored_features_give_the_forward_pass_scores(runs):
    fwd, cached = assistant_turns(runs["forward"] / "labeled.jsonl"), assistant_turns(runs["cached"] / "labeled.jsonl")
    assert fwd.keys() == cached.keys()
    scored = [k for k, t in fwd.items() if t.get("scores")]
    assert len(scored) > 50
    for k in scored:
        for a, v in fwd[k]["scores"].items():
            assert cached[k]["scores"][a] == pytest.approx(v, abs=1e-4)
    summary = json.loads((runs["cached"] / "summary.json").read_text())
    assert summary["turns_from_feature_cache"] >= 0.9 * len(scored)  # the RM's own training turns: no forward
    assert json.loads((runs["forward"] / "summary.json").read_text())["turns_from_feature_cache"] == 0


def test_calibrated_labels_are_spread_and_human_labels_kept(runs):
    assert json.loads((runs["calibrated"] / "summary.json").read_text())["turns_from_feature_cache"] > 50  # auto found it
    turns = assistant_turns(runs["calibrated"] / "labeled.jsonl")
    rated = [t for t in turns.values() if t.get("scores")]
    assert all(set(t["scores"]) == {"verbosity", "quality"} for t in rated)  # `attributes` limits what is written
    summary = json.loads((runs["calibrated"] / "summary.json").read_text())
    qmap = summary["calibration"]["attributes"]["verbosity"]["map"]
    verbosity = [t["labels"]["verbosity"] for t in rated]
    # every label is the recorded quantile map applied to the RM score; the uniform target uses every level
    assert verbosity == apply_quantile_map(qmap, [t["scores"]["verbosity"] for t in rated]).tolist()
    assert qmap["fractions"] == [0.2] * 5 and {0.0, 1.0, 2.0, 3.0, 4.0} <= set(verbosity)
    rounded = [t["labels"]["verbosity"] for t in assistant_turns(runs["cached"] / "labeled.jsonl").values() if t.get("scores")]
    assert len(set(verbosity)) > len(set(rounded))  # what plain rounding of a weak RM's scores gives
    human = [t for t in rated if "quality" in (t.get("human_labels") or [])]
    assert human, "OASST turns carry human quality labels"
    forward = assistant_turns(runs["forward"] / "labeled.jsonl")
    for (key, t) in turns.items():
        if "quality" in (t.get("human_labels") or []):
            assert t["labels"]["quality"] == forward[key]["labels"]["quality"]  # the human value, untouched
        if t.get("labels"):
            assert t["label"] == STEERLM9.format_label(t["labels"])  # the string follows the calibrated values
    assert summary["calibration"]["method"] == "quantile" and summary["written_attributes"] == ["quality", "verbosity"]
    assert set(summary["calibration"]["attributes"]) == {"verbosity", "quality"}


def test_a_cache_from_another_rm_is_refused_in_one_line(runs, tiny_model_dir):
    other = runs["base"] / "other_rm"
    run_recipe("train_reward", f"model.path={tiny_model_dir}", "model.freeze_backbone=true", "engine.precision=fp32",
               "train.epochs=1", "train.save_every=0", "max_length=1024", "seed=7",
               "data.train=[{format: helpsteer2, path: data/helpsteer2/helpsteer2_train_first100.jsonl}]",
               f"run_dir={other}")
    proc = run_recipe("label", f"rm={other / 'model'}", INPUT, "max_length=1024",
                      f"reuse_features={runs['base'] / 'rm' / 'cache'}", f"output_dir={runs['base'] / 'refused'}",
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("steerlm: error: reuse_features: the features in")
    assert not (runs["base"] / "refused" / "labeled.jsonl").exists()
