"""NeMo-Aligner chat / regression JSONL: import, template parsing, errors and round trips."""

import json
from pathlib import Path

import pytest

from steerlm.attributes import get_schema
from steerlm.data.nemo import (NEMO_SYSTEM_PROMPT, parse_nemo_text, render_nemo_text, to_nemo_chat,
                               write_nemo_chat, write_nemo_regression)
from steerlm.data.schema import rated_samples
from steerlm.data.sources import load_conversations
from steerlm.errors import DataError

DATA = Path(__file__).resolve().parents[1] / "data"
HS2 = str(DATA / "helpsteer2" / "helpsteer2_train_first100.jsonl")
OASST = str(DATA / "oasst1" / "oasst1_validation_en.messages.jsonl.gz")
S9 = get_schema("steerlm9")


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_row(*turns, system=NEMO_SYSTEM_PROMPT):
    return {"system": system, "mask": "User", "type": "VALUE_TO_TEXT",
            "conversations": [{"from": f, "value": v, "label": lab} for f, v, lab in turns]}


GOOD = chat_row(("User", "Hi", None), ("Assistant", "Hello", "quality:4,toxicity:0,helpfulness:3"),
                ("User", "More?", None), ("Assistant", "Sure", None))


def test_chat_import(tmp_path):
    other = chat_row(("User", "Q", None), ("Assistant", "A", ""), system="Be brief.")
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, other])
    convs, stats = load_conversations({"format": "nemo_chat", "path": path}, S9)
    assert stats == {"source": path, "format": "nemo_chat", "rows_read": 2, "kept": 2, "skipped": {}, "rated_turns": 1}
    c = convs[0]
    assert c["id"] == "chat/1" and c["system"] is None  # NeMo's default system prompt -> template default
    assert [(t["role"], t["labels"]) for t in c["turns"]] == [
        ("user", None), ("assistant", {"quality": 4.0, "toxicity": 0.0, "helpfulness": 3.0}),
        ("user", None), ("assistant", None)]
    assert convs[1]["system"] == "Be brief." and convs[1]["turns"][1]["labels"] is None


@pytest.mark.parametrize("label, message", [
    ("quality:4,helpfullness:3", "unknown attribute 'helpfullness'"),
    ("quality:5", "outside [0, 4]"),
    ("quality:-1", "outside [0, 4]"),
    ("quality=4", "is not 'name:value'"),
    ("quality:x", "is not a number"),
])
def test_chat_bad_label_names_file_line_and_turn(tmp_path, label, message):
    bad = chat_row(("User", "Hi", None), ("Assistant", "Hello", None), ("User", "More?", None),
                   ("Assistant", "Sure", label))
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as e:
        load_conversations({"format": "nemo_chat", "path": path}, S9)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:2: field 'conversations[3].label':") and message in msg


@pytest.mark.parametrize("row, field", [
    (chat_row(("User", "Hi", "quality:4"), ("Assistant", "Hello", None)), "conversations[0].label"),
    (chat_row(("Bot", "Hi", None)), "conversations[0].from"),
    (chat_row(("User", "", None), ("Assistant", "Hello", None)), "conversations[0].value"),
    ({"system": "s", "conversations": []}, "conversations"),
])
def test_chat_structural_errors(tmp_path, row, field):
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_conversations({"format": "nemo_chat", "path": path}, S9)
    assert str(e.value).startswith(f"{path}:1: field '{field}':")


def test_render_matches_nemo_template_exactly():
    turns = [{"role": "user", "content": "Hi", "labels": None},
             {"role": "assistant", "content": "Hello", "labels": {"quality": 4.0}}]
    expected = (f"<extra_id_0>System\n{NEMO_SYSTEM_PROMPT}\n<extra_id_1>User\nHi\n"
                "<extra_id_1>Assistant\nHello\n<extra_id_2>")
    assert render_nemo_text(None, turns) == expected
    assert parse_nemo_text(expected) == (None, [{"role": "user", "content": "Hi", "labels": None},
                                                {"role": "assistant", "content": "Hello", "labels": None}])
    assert parse_nemo_text("<extra_id_0>System\nS\n<extra_id_1>User\na\nb\n\n<extra_id_1>Assistant\nc\n")[0] == "S"


def regression_row(text, label):
    return {"text": text, "label": label}


MULTI = ("<extra_id_0>System\nS\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\nA1\n"
         "<extra_id_1>User\nQ2\n<extra_id_1>Assistant\nA2\n<extra_id_2>")


def test_regression_import(tmp_path):
    vec = [-100, -100, -100, -100, 4, 4, 4, 3, 2]  # the row in NeMo-Aligner's test-rm.jsonl
    path = write_jsonl(tmp_path / "reg.jsonl", [regression_row(MULTI, vec), regression_row(MULTI, [-100] * 9)])
    convs, stats = load_conversations({"format": "nemo_regression", "path": path}, S9)
    assert stats["rows_read"] == 2 and stats["kept"] == 1 and stats["skipped"] == {"no_labels": 1}
    c = convs[0]
    assert c["system"] == "S" and c["id"] == "reg/1"
    assert [(t["role"], t["content"]) for t in c["turns"]] == [
        ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    assert c["turns"][1]["labels"] is None
    assert c["turns"][3]["labels"] == {"helpfulness": 4.0, "correctness": 4.0, "coherence": 4.0,
                                       "complexity": 3.0, "verbosity": 2.0}


@pytest.mark.parametrize("row, message", [
    (regression_row(MULTI, [4, 4, 4, 3, 2]), "has 5 entries, schema 'steerlm9' has 9"),
    (regression_row(MULTI, [-100] * 8 + [7]), "outside"),
    (regression_row(MULTI, "4,4"), "expected a list"),
    (regression_row("just text", [1] * 9), "field 'text'"),
    (regression_row("<extra_id_1>User\nQ\n<extra_id_2>", [1] * 9), "last turn is not an assistant turn"),
    ({"label": [1] * 9}, "field 'text': missing"),
])
def test_regression_errors(tmp_path, row, message):
    path = write_jsonl(tmp_path / "reg.jsonl", [regression_row(MULTI, [1] * 9), row])
    with pytest.raises(DataError) as e:
        load_conversations({"format": "nemo_regression", "path": path}, S9)
    assert str(e.value).startswith(f"{path}:2: field ") and message in str(e.value)


def real_conversations():
    hs2, _ = load_conversations({"format": "helpsteer2", "path": HS2}, S9)
    oasst, _ = load_conversations({"format": "oasst", "path": OASST}, S9)
    return hs2 + oasst


def strip_ids(convs):
    return [{"system": c["system"], "turns": c["turns"]} for c in convs]


def test_chat_round_trip_on_real_data(tmp_path):
    convs = real_conversations()
    convs[0] = {**convs[0], "system": "Custom system."}
    convs[1] = {**convs[1], "turns": [*convs[1]["turns"][:-1],
                                      {**convs[1]["turns"][-1], "labels": {"helpfulness": 2.5, "humor": 0.0}}]}
    path = tmp_path / "chat.jsonl"
    assert write_nemo_chat(convs, path, S9) == len(convs) == 1309
    back, stats = load_conversations({"format": "nemo_chat", "path": str(path)}, S9)
    assert strip_ids(back) == strip_ids(convs)
    assert stats["rated_turns"] == 1309


def test_chat_export_can_round_labels_like_nemo():
    conv = {"id": "x", "group": "g", "system": None, "source": "s",
            "turns": [{"role": "user", "content": "q", "labels": None},
                      {"role": "assistant", "content": "a", "labels": {"helpfulness": 2.6, "quality": 1.0}}]}
    assert to_nemo_chat(conv, S9)["conversations"][1]["label"] == "quality:1,helpfulness:2.6"
    assert to_nemo_chat(conv, S9, round_labels=True)["conversations"][1]["label"] == "quality:1,helpfulness:3"
    assert to_nemo_chat(conv, S9)["system"] == NEMO_SYSTEM_PROMPT


def test_regression_round_trip_on_real_data(tmp_path):
    convs = real_conversations()
    multi = {"id": "m", "group": "g", "system": "S", "source": "s", "turns": [
        {"role": "user", "content": "q1", "labels": None},
        {"role": "assistant", "content": "a1", "labels": {"quality": 2.0}},
        {"role": "user", "content": "q2", "labels": None},
        {"role": "assistant", "content": "a2", "labels": {"humor": 1.0, "verbosity": 3.5}}]}
    path = tmp_path / "reg.jsonl"
    assert write_nemo_regression(convs + [multi], path, S9) == 1309 + 2  # one row per rated turn
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["label"][:4] == [-100.0] * 4 and rows[-1]["label"][2] == 1.0 and rows[-1]["label"][8] == 3.5
    back, _ = load_conversations({"format": "nemo_regression", "path": str(path)}, S9)
    # The regression format keeps only the scored turn's labels (earlier turns are plain text).
    expected = [{**e, "turns": [*[{**t, "labels": None} for t in e["turns"][:-1]], e["turns"][-1]]}
                for e in rated_samples(convs + [multi])]
    assert len(back) == len(expected) == 1311
    assert [(b["system"], b["turns"]) for b in back] == [(e["system"], e["turns"]) for e in expected]
