"""Spec-driven loading (all formats, mixtures, hub dispatch) and group-preserving splits."""

import json
import sys
import types
from pathlib import Path

import pytest

from steerlm.attributes import get_schema
from steerlm.data.sources import describe_stats, load_conversations, load_mixture, load_preference_pairs
from steerlm.data.split import split_by_group
from steerlm.errors import DataError

DATA = Path(__file__).resolve().parents[1] / "data"
HS2 = str(DATA / "helpsteer2" / "helpsteer2_train_first100.jsonl")
OASST = str(DATA / "oasst1" / "oasst1_validation_en.messages.jsonl.gz")
S9 = get_schema("steerlm9")
HS2_SPEC = {"format": "helpsteer2", "path": HS2}
OASST_SPEC = {"format": "oasst", "path": OASST}


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------ canonical + mixtures
def test_canonical_round_trip(tmp_path):
    convs, _ = load_conversations(HS2_SPEC, S9)
    path = write_jsonl(tmp_path / "canon.jsonl", convs)
    back, stats = load_conversations({"format": "canonical", "path": path}, S9)
    assert back == convs and stats["rows_read"] == stats["kept"] == 100


@pytest.mark.parametrize("mutate, field, message", [
    (lambda c: c["turns"][1].update(role="bot"), "turns[1].role", "is not one of"),
    (lambda c: c["turns"][1].update(labels={"helpfulness": 9}), "turns[1].labels", "outside"),
    (lambda c: c["turns"][1].update(labels={"niceness": 2}), "turns[1].labels", "unknown attribute 'niceness'"),
    (lambda c: c["turns"][0].update(content=""), "turns[0].content", "missing or empty prompt"),
    (lambda c: c["turns"][1].update(content=" "), "turns[1].content", "missing or empty response"),
    (lambda c: c.update(group=""), "group", "missing or empty"),
])
def test_canonical_bad_rows_name_file_line_and_field(tmp_path, mutate, field, message):
    convs, _ = load_conversations({**HS2_SPEC, "max_rows": 3}, S9)
    mutate(convs[2])
    path = write_jsonl(tmp_path / "canon.jsonl", convs)
    with pytest.raises(DataError) as e:
        load_conversations({"format": "canonical", "path": path}, S9)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:3: field '{field}':") and message in msg


def test_canonical_duplicate_ids(tmp_path):
    convs, _ = load_conversations({**HS2_SPEC, "max_rows": 2}, S9)
    path = write_jsonl(tmp_path / "canon.jsonl", [convs[0], convs[1], convs[0]])
    with pytest.raises(DataError, match=r"canon\.jsonl:3: field 'id': duplicate id 'helpsteer2/1' \(first on line 1\)"):
        load_conversations({"format": "canonical", "path": path}, S9)


@pytest.mark.parametrize("fmt", ["helpsteer2", "oasst", "nemo_chat", "nemo_regression", "canonical"])
def test_empty_dataset_is_an_error_for_every_format(tmp_path, fmt):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError) as e:
        load_conversations({"format": fmt, "path": str(path)}, S9)
    assert str(e.value) == f"{path}: no records"


def test_malformed_json_reaches_the_caller_with_file_and_line(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(Path(HS2).read_text().splitlines()[0] + "\n{broken\n")
    with pytest.raises(DataError, match=r"hs\.jsonl:2: malformed JSON"):
        load_conversations({"format": "helpsteer2", "path": str(path)}, S9)


def test_mixture_concatenates_and_reports_stats():
    items, stats = load_mixture([HS2_SPEC, OASST_SPEC], S9)
    assert len(items) == stats["total"] == 100 + 1209
    assert [s["format"] for s in stats["sources"]] == ["helpsteer2", "oasst"]
    assert [s["kept"] for s in stats["sources"]] == [100, 1209]
    text = describe_stats(stats)
    assert "read 100 rows, kept 100, skipped: none" in text and "deleted 28" in text


def test_mixture_rejects_duplicate_ids_and_names_fix_it():
    with pytest.raises(DataError, match=r"field 'id': duplicate id 'helpsteer2/1'.*distinct 'name'"):
        load_mixture([HS2_SPEC, HS2_SPEC], S9)
    items, _ = load_mixture([HS2_SPEC, {**HS2_SPEC, "name": "hs2copy"}], S9)
    assert len(items) == 200 and items[100]["id"] == "hs2copy/1"


def test_mixture_of_pairs(tmp_path):
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "Q", "response_1": "a", "response_2": "b",
                                                  "preference_strength": -1, "split": "train"}])
    pairs, stats = load_mixture([{"format": "helpsteer2", "path": pref}, OASST_SPEC], S9, kind="pairs")
    assert stats["total"] == len(pairs) == 1 + 1021
    canon = write_jsonl(tmp_path / "pairs.jsonl", pairs[:5])
    back, _ = load_preference_pairs({"format": "canonical", "path": canon})
    assert back == pairs[:5]


def test_canonical_pair_errors(tmp_path):
    pairs, _ = load_preference_pairs({**OASST_SPEC, "max_rows": 200})
    bad = {**pairs[1], "strength": -1}
    path = write_jsonl(tmp_path / "pairs.jsonl", [pairs[0], bad])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: field 'strength'"):
        load_preference_pairs({"format": "canonical", "path": path})
    bad = {**pairs[1], "context": pairs[1]["context"] + [{"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [bad])
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: field 'context': the context must end with a user turn"):
        load_preference_pairs({"format": "canonical", "path": path})


def test_max_rows():
    convs, stats = load_conversations({**HS2_SPEC, "max_rows": 10}, S9)
    assert len(convs) == 10 and stats["rows_read"] == 10 and stats["max_rows"] == 10
    _, stats = load_conversations({**OASST_SPEC, "max_rows": 50}, S9)
    assert stats["rows_read"] == 50


@pytest.mark.parametrize("spec, message", [
    ({"format": "alpaca", "path": HS2}, "format 'alpaca' is not one of"),
    ({"format": "helpsteer2", "path": HS2, "splt": "train"}, "unknown keys ['splt']"),
    ({"format": "helpsteer2"}, "has no 'path'"),
    ({"format": "helpsteer2", "path": HS2, "max_rows": 0}, "max_rows must be a positive integer"),
    ({"format": "helpsteer2", "path": HS2, "split": "validation"}, "this is a local file"),
    ({"format": "nemo_chat", "path": HS2, "lang": "en"}, "applies only to formats"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError) as e:
        load_conversations(spec, S9)
    assert message in str(e.value)


def test_pairs_are_not_offered_for_nemo_formats():
    with pytest.raises(ValueError, match="is not one of"):
        load_preference_pairs({"format": "nemo_regression", "path": HS2})


def test_hub_specs_use_the_documented_hub_layout(monkeypatch):
    calls = []
    rows = {None: [{"prompt": "Q", "response": "A", "helpfulness": 3, "correctness": 3, "coherence": 4,
                    "complexity": 1, "verbosity": 2}],
            "preference": [{"prompt": "Q", "response_1": "a", "response_2": "b", "preference_strength": 2,
                            "split": s} for s in ("train", "val", "train")]}

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return rows[kwargs.get("data_dir")]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    convs, stats = load_conversations({"format": "helpsteer2", "path": "nvidia/HelpSteer2", "split": "validation"}, S9)
    assert calls[-1] == ("nvidia/HelpSteer2", {"split": "validation"})
    assert convs[0]["id"] == "helpsteer2/validation/1" and stats["source"] == "hf:nvidia/HelpSteer2[validation]"
    pairs, stats = load_preference_pairs({"format": "helpsteer2", "path": "nvidia/HelpSteer2", "split": "validation"})
    assert calls[-1] == ("nvidia/HelpSteer2", {"split": "train", "data_dir": "preference"})
    assert [p["id"] for p in pairs] == ["helpsteer2-preference/2"] and stats["skipped"]["other_split"] == 2


# ------------------------------------------------------------------ split
def test_split_never_separates_groups_and_is_deterministic():
    items, _ = load_mixture([HS2_SPEC, OASST_SPEC], S9)
    train, val = split_by_group(items, 0.2, seed=3)
    assert len(train) + len(val) == len(items)
    assert not {c["group"] for c in train} & {c["group"] for c in val}
    assert split_by_group(items, 0.2, seed=3) == (train, val)
    n_groups = len({c["group"] for c in items})
    assert 0.1 * n_groups < len({c["group"] for c in val}) < 0.3 * n_groups
    other_train, _ = split_by_group(items, 0.2, seed=4)
    assert other_train != train
    assert [c["id"] for c in train] == [c["id"] for c in items if c in train]  # order kept


def test_split_is_stable_when_data_is_added():
    hs2, _ = load_conversations(HS2_SPEC, S9)
    both, _ = load_mixture([HS2_SPEC, OASST_SPEC], S9)
    _, val_small = split_by_group(hs2, 0.3, seed=0)
    _, val_big = split_by_group(both, 0.3, seed=0)
    assert {c["group"] for c in val_small} == {c["group"] for c in val_big if c["source"] == "helpsteer2"}


@pytest.mark.parametrize("fraction", [0.0001, 0.5, 0.9999])
def test_split_sides_are_non_empty_with_two_groups(fraction):
    items = [{"id": "a", "group": "g1"}, {"id": "b", "group": "g1"}, {"id": "c", "group": "g2"}]
    for seed in range(5):
        train, val = split_by_group(items, fraction, seed)
        assert train and val and not {i["group"] for i in train} & {i["group"] for i in val}


def test_split_edge_cases():
    items = [{"id": "a", "group": "g1"}, {"id": "b", "group": "g2"}]
    assert split_by_group(items, 0.0, 0) == (items, [])
    assert split_by_group(items[:1], 0.5, 0) == (items[:1], [])  # one group cannot be split
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_group(items, 1.0, 0)
    with pytest.raises(ValueError, match="no 'group'"):
        split_by_group([{"id": "x"}], 0.5, 0)
