"""HelpSteer2 and OASST loaders on the real bundled data, plus small hand-written edge cases."""

import collections
import gzip
import itertools
import json
from pathlib import Path

import pytest

from steerlm.attributes import AttributeSchema, get_schema
from steerlm.data.helpsteer2 import helpsteer2_conversations, helpsteer2_preference_pairs, split_prompt_turns
from steerlm.data.oasst import encode_labels, oasst_conversations, oasst_preference_pairs
from steerlm.data.readers import read_records
from steerlm.data.sources import load_conversations, load_preference_pairs
from steerlm.errors import DataError

DATA = Path(__file__).resolve().parents[1] / "data"
HS2 = str(DATA / "helpsteer2" / "helpsteer2_train_first100.jsonl")
OASST = str(DATA / "oasst1" / "oasst1_validation_en.messages.jsonl.gz")
S9 = get_schema("steerlm9")
OASST_ATTRS = {"quality", "toxicity", "humor", "creativity"}


def write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def hs2_row(prompt="Hi?", response="Hello.", **ratings):
    row = {"prompt": prompt, "response": response, "helpfulness": 3, "correctness": 4, "coherence": 4,
           "complexity": 2, "verbosity": 1}
    row.update(ratings)
    return row


# ------------------------------------------------------------------ HelpSteer2 ratings
def test_helpsteer2_real_sample():
    convs, stats = load_conversations({"format": "helpsteer2", "path": HS2}, S9)
    assert len(convs) == 100 and stats["rows_read"] == 100 and stats["kept"] == 100 and stats["skipped"] == {}
    assert [c["id"] for c in convs[:2]] == ["helpsteer2/1", "helpsteer2/2"]
    first = convs[0]
    assert [t["role"] for t in first["turns"]] == ["user", "assistant"]
    assert first["turns"][0]["content"] == "c#" and first["turns"][0]["labels"] is None
    assert first["turns"][1]["labels"] == {"helpfulness": 3.0, "correctness": 4.0, "coherence": 4.0,
                                           "complexity": 2.0, "verbosity": 1.0}
    # Label distribution stated in data/helpsteer2/SOURCE.md.
    helpfulness = collections.Counter(int(c["turns"][-1]["labels"]["helpfulness"]) for c in convs)
    assert helpfulness == {0: 5, 1: 7, 2: 10, 3: 34, 4: 44}
    for c in convs:
        assert set(c["turns"][-1]["labels"]) == {"helpfulness", "correctness", "coherence", "complexity", "verbosity"}
        assert all(v in {0.0, 1.0, 2.0, 3.0, 4.0} for v in c["turns"][-1]["labels"].values())


def test_helpsteer2_groups_pair_consecutive_rows_sharing_a_prompt():
    convs, _ = load_conversations({"format": "helpsteer2", "path": HS2}, S9)
    groups = [c["group"] for c in convs]
    assert len(set(groups)) == 50
    assert all(groups[i] == groups[i + 1] for i in range(0, 100, 2))
    assert all(groups[i] != groups[i + 2] for i in range(0, 98, 2))
    again, _ = load_conversations({"format": "helpsteer2", "path": HS2}, S9)
    assert [c["group"] for c in again] == groups  # stable across runs


def test_helpsteer2_multi_turn_markers_become_turns(tmp_path):
    prompt = "What is 2+2?\n<extra_id_1>Assistant\n4.\n<extra_id_1>User\nAnd 3+3?"
    path = write_jsonl(tmp_path / "hs.jsonl", [hs2_row(prompt, "6.")])
    convs, stats = load_conversations({"format": "helpsteer2", "path": path}, S9)
    turns = convs[0]["turns"]
    assert [(t["role"], t["content"], t["labels"] is None) for t in turns] == [
        ("user", "What is 2+2?", True), ("assistant", "4.", True), ("user", "And 3+3?", True),
        ("assistant", "6.", False)]
    assert stats["multi_turn"] == 1


def test_split_prompt_turns_rejects_a_prompt_ending_with_the_assistant():
    with pytest.raises(DataError, match="ends with an assistant turn"):
        split_prompt_turns("Q\n<extra_id_1>Assistant\nA", where="f.jsonl", line=4)
    with pytest.raises(DataError, match=r"f\.jsonl:4: field 'prompt': turn 1 \(assistant\)"):
        split_prompt_turns("Q\n<extra_id_1>Assistant\n\n<extra_id_1>User\nQ2", where="f.jsonl", line=4)


@pytest.mark.parametrize("row, field, message", [
    (hs2_row(helpfulness=5), "helpfulness", "outside"),
    (hs2_row(verbosity=-1), "verbosity", "outside"),
    (hs2_row(coherence="high"), "coherence", "not a number"),
    (hs2_row(correctness=None), "correctness", "missing rating"),
    ({k: v for k, v in hs2_row().items() if k != "prompt"}, "prompt", "missing or empty"),
    (hs2_row(response="   "), "response", "missing or empty"),
])
def test_helpsteer2_bad_rows_name_file_line_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "hs.jsonl", [hs2_row(), row])
    with pytest.raises(DataError) as e:
        load_conversations({"format": "helpsteer2", "path": path}, S9)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:2: field '{field}':") and message in msg


def test_helpsteer2_schema_without_its_attributes_is_an_error_unless_restricted(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl", [hs2_row()])
    with pytest.raises(DataError, match=r"hs\.jsonl:1: field 'helpfulness': attribute not in schema 'oasst'"):
        load_conversations({"format": "helpsteer2", "path": path}, get_schema("oasst"))
    only_help = AttributeSchema("help", ("helpfulness",))
    convs, _ = load_conversations({"format": "helpsteer2", "path": path, "attributes": ["helpfulness"]}, only_help)
    assert convs[0]["turns"][-1]["labels"] == {"helpfulness": 3.0}


# ------------------------------------------------------------------ HelpSteer2 preference
def pref_row(strength, split="train", prompt="Q?"):
    return {"prompt": prompt, "response_1": "one", "response_2": "two", "preference_strength": strength,
            "split": split, "preference_statement": "..."}


def test_helpsteer2_preference_sign_strength_ties_and_split(tmp_path):
    rows = [pref_row(-2), pref_row(0), pref_row(3), pref_row(1, "val"), pref_row(0, "val")]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    pairs, stats = load_preference_pairs({"format": "helpsteer2", "path": path})
    assert [(p["chosen"], p["rejected"], p["strength"]) for p in pairs] == [
        ("one", "two", 2.0), ("two", "one", 3.0), ("two", "one", 1.0)]
    assert stats["rows_read"] == 5 and stats["kept"] == 3 and stats["skipped"] == {"tie": 2, "other_split": 0, "identical_responses": 0}
    train, tstats = load_preference_pairs({"format": "helpsteer2", "path": path, "split": "train"})
    assert len(train) == 2 and tstats["skipped"] == {"tie": 1, "other_split": 2, "identical_responses": 0}
    val, vstats = load_preference_pairs({"format": "helpsteer2", "path": path, "split": "validation"})
    assert [p["strength"] for p in val] == [1.0] and vstats["skipped"] == {"tie": 1, "other_split": 3, "identical_responses": 0}
    assert pairs[0]["context"] == [{"role": "user", "content": "Q?", "labels": None}]


def test_helpsteer2_preference_and_ratings_share_the_prompt_group(tmp_path):
    pairs, _ = helpsteer2_preference_pairs([(1, pref_row(1, prompt="c#"))], where="x")
    convs, _ = helpsteer2_conversations([(1, hs2_row("c#"))], S9, where="y")
    assert pairs[0]["group"] == convs[0]["group"]


@pytest.mark.parametrize("strength", [4, -4, 1.5, "2", None, True])
def test_helpsteer2_preference_bad_strength(tmp_path, strength):
    path = write_jsonl(tmp_path / "pref.jsonl", [pref_row(1), pref_row(strength)])
    with pytest.raises(DataError, match=r"pref\.jsonl:2: field 'preference_strength': expected an integer in -3\.\.3"):
        load_preference_pairs({"format": "helpsteer2", "path": path})


# ------------------------------------------------------------------ OASST
def naive_usable(rows):
    """Independent reference: messages whose whole chain exists and is not deleted."""
    by_id = {r["message_id"]: r for r in rows}

    def ok(r):
        while True:
            if r["deleted"]:
                return False
            if r["parent_id"] is None:
                return True
            if r["parent_id"] not in by_id:
                return False
            r = by_id[r["parent_id"]]
    return by_id, ok


def test_oasst_real_counts_and_shape():
    convs, stats = load_conversations({"format": "oasst", "path": OASST}, S9)
    rows = [r for _, r in read_records(OASST)]
    by_id, ok = naive_usable(rows)
    expected = [r for r in rows if r["role"] == "assistant" and ok(r) and OASST_ATTRS & set(r["labels"]["name"])]
    assert len(convs) == len(expected) == 1209
    assert [c["id"] for c in convs] == [f"oasst1/{r['message_id']}" for r in expected]
    assert stats["messages"] == 2022 and stats["assistant_messages"] == 1243 and stats["prompter_messages"] == 779
    assert stats["skipped"] == {"deleted": 28, "missing_parent": 2, "unrated": 4}
    assert stats["kept"] + sum(stats["skipped"].values()) == stats["assistant_messages"]
    assert collections.Counter(len(c["turns"]) for c in convs) == {2: 554, 4: 633, 6: 22}
    for c in convs:
        roles = [t["role"] for t in c["turns"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(t["labels"] is None for t in c["turns"][:-1])
        labels = c["turns"][-1]["labels"]
        assert labels and set(labels) <= OASST_ATTRS and all(v in {0.0, 1.0, 2.0, 3.0, 4.0} for v in labels.values())
        assert c["group"] == f"oasst1/tree/{by_id[c['id'].split('/')[1]]['message_tree_id']}"
    assert len({c["group"] for c in convs}) <= 191


def test_oasst_labels_follow_nemo_encode_labels():
    # round(v * 4) with Python's round, exactly as NeMo-Aligner: 0.625 -> 2.5 -> 2, 0.875 -> 3.5 -> 4.
    table = {"name": ["quality", "humor", "spam", "creativity", "helpfulness"],
             "value": [0.625, 0.875, 1.0, 0.1, 0.9], "count": [3, 3, 3, 3, 3]}
    assert encode_labels(table) == {"quality": 2.0, "humor": 4.0, "creativity": 0.0}
    tree_shape = {"quality": {"value": 0.625, "count": 3}, "toxicity": {"value": 0.3, "count": 2}}
    assert encode_labels(tree_shape) == {"quality": 2.0, "toxicity": 1.0}
    convs, _ = load_conversations({"format": "oasst", "path": OASST}, S9)
    assert convs[0]["turns"][-1]["labels"] == {"quality": 3.0, "toxicity": 0.0, "humor": 0.0, "creativity": 0.0}


def msg(mid, parent, role, text="t", deleted=False, rank=None, quality=0.5, lang="en", tree="T"):
    labels = {"name": ["quality"], "value": [quality], "count": [3]} if quality is not None else None
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "deleted": deleted, "rank": rank,
            "labels": labels, "lang": lang, "message_tree_id": tree}


def test_oasst_skips_are_counted_by_reason(tmp_path):
    rows = [msg("r", None, "prompter"), msg("a1", "r", "assistant", rank=0),
            msg("a2", "r", "assistant", deleted=True, rank=1),
            msg("p2", "a2", "prompter"), msg("a3", "p2", "assistant"),       # below a deleted message
            msg("a4", "ghost", "assistant"),                                 # parent not in the file
            msg("a5", "r", "assistant", quality=None, rank=2),               # no SteerLM labels
            msg("a6", "r", "assistant", lang="de", rank=3)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    convs, stats = load_conversations({"format": "oasst", "path": path}, S9)
    assert [c["id"] for c in convs] == ["oasst1/a1", "oasst1/a6"]
    assert stats["skipped"] == {"ancestor_deleted": 1, "deleted": 1, "missing_parent": 1, "unrated": 1}
    en, en_stats = load_conversations({"format": "oasst", "path": path, "lang": "en"}, S9)
    assert [c["id"] for c in en] == ["oasst1/a1"] and en_stats["skipped"]["other_lang"] == 1


def test_oasst_out_of_range_label_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [msg("r", None, "prompter"), msg("a", "r", "assistant", quality=1.5)])
    with pytest.raises(DataError, match=r"m\.jsonl:2: field 'turns\[1\]\.labels': attribute 'quality'.*outside"):
        load_conversations({"format": "oasst", "path": path}, S9)


def to_trees(rows):
    """Rebuild the trees-dump shape from the message table (labels as {name: {value, count}})."""
    children = collections.defaultdict(list)
    for r in rows:
        children[r["parent_id"]].append(r)

    def nest(r):
        out = {k: v for k, v in r.items() if k not in ("parent_id", "labels", "message_tree_id")}
        if r["labels"]:
            out["labels"] = {n: {"value": v, "count": c} for n, v, c in
                             zip(r["labels"]["name"], r["labels"]["value"], r["labels"]["count"])}
        out["replies"] = [nest(c) for c in children[r["message_id"]]]
        return out
    return [{"message_tree_id": r["message_tree_id"], "tree_state": "ready_for_export", "prompt": nest(r)}
            for r in children[None]]


def test_oasst_trees_and_message_table_give_the_same_conversations_and_pairs(tmp_path):
    rows = [r for _, r in read_records(OASST)]
    trees = to_trees(rows)
    path = write_jsonl(tmp_path / "2023-04-12_oasst_all.trees.jsonl.gz", trees)
    from_table, table_stats = load_conversations({"format": "oasst", "path": OASST}, S9)
    from_trees, tree_stats = load_conversations({"format": "oasst", "path": path}, S9)
    assert tree_stats["trees"] == len(trees) == 188
    assert sorted(from_trees, key=lambda c: c["id"]) == sorted(from_table, key=lambda c: c["id"])
    # Orphans (parent not in the English subset) cannot be nested in a tree, so that reason vanishes.
    assert tree_stats["skipped"] == {k: v for k, v in table_stats["skipped"].items() if k != "missing_parent"}
    pairs_table, _ = load_preference_pairs({"format": "oasst", "path": OASST})
    pairs_trees, _ = load_preference_pairs({"format": "oasst", "path": path})
    assert sorted(pairs_trees, key=lambda p: p["id"]) == sorted(pairs_table, key=lambda p: p["id"])


def test_oasst_real_preference_pairs():
    pairs, stats = load_preference_pairs({"format": "oasst", "path": OASST})
    rows = [r for _, r in read_records(OASST)]
    by_id, ok = naive_usable(rows)
    ranks = collections.defaultdict(list)
    for r in rows:
        if r["role"] == "assistant" and ok(r) and r["rank"] is not None:
            ranks[r["parent_id"]].append(r["rank"])
    expected = sum(a != b for v in ranks.values() for a, b in itertools.combinations(v, 2))
    assert len(pairs) + stats["identical_pairs"] == expected == 1022
    assert stats["identical_pairs"] == 1 and stats["tied_pairs"] == 0  # one duplicated reply text in the data
    assert stats["skipped"] == {"deleted": 28, "missing_parent": 2, "no_ranked_sibling": 3, "unranked": 83}
    assert stats["paired_replies"] + sum(stats["skipped"].values()) == stats["assistant_messages"] == 1243
    text_rank = {r["text"]: r["rank"] for r in rows if r["role"] == "assistant"}
    for p in pairs:
        assert p["context"][-1]["role"] == "user" and p["chosen"] != p["rejected"]
        chosen_id, rejected_id = p["id"].split("/")[2:]
        assert by_id[chosen_id]["parent_id"] == by_id[rejected_id]["parent_id"]
        assert p["strength"] == by_id[rejected_id]["rank"] - by_id[chosen_id]["rank"] > 0
        assert text_rank[p["chosen"]] is not None


def test_oasst_pairs_ties_identical_texts_and_unranked(tmp_path):
    rows = [msg("r", None, "prompter"), msg("a", "r", "assistant", "x", rank=0),
            msg("b", "r", "assistant", "y", rank=0), msg("c", "r", "assistant", "z", rank=2),
            msg("d", "r", "assistant", rank=None), msg("e", "r", "assistant", "z", rank=3)]
    pairs, stats = oasst_preference_pairs(enumerate(rows, 1), where="m")
    assert sorted((p["id"], p["strength"]) for p in pairs) == [
        ("oasst1/pair/a/c", 2.0), ("oasst1/pair/a/e", 3.0), ("oasst1/pair/b/c", 2.0), ("oasst1/pair/b/e", 3.0)]
    assert stats["tied_pairs"] == 1 and stats["identical_pairs"] == 1  # a~b tie, c and e say the same
    assert stats["skipped"] == {"unranked": 1} and stats["paired_replies"] == 4


def test_helpsteer2_preference_identical_responses_are_counted(tmp_path):
    row = {**pref_row(2), "response_2": "one"}
    pairs, stats = helpsteer2_preference_pairs([(1, row), (2, pref_row(1))], where="p")
    assert len(pairs) == 1 and stats["skipped"]["identical_responses"] == 1


def test_oasst_duplicate_message_id_is_an_error():
    rows = [msg("r", None, "prompter"), msg("r", None, "prompter")]
    with pytest.raises(DataError, match=r"m:2: field 'message_id': duplicate message_id r \(first on line 1\)"):
        oasst_conversations(enumerate(rows, 1), S9, where="m")


def test_oasst_parent_cycle_and_bad_tree_rows_are_data_errors(tmp_path):
    rows = [msg("a", "b", "assistant"), msg("b", "a", "prompter")]
    with pytest.raises(DataError, match="parent cycle"):
        oasst_conversations(enumerate(rows, 1), S9, where="m")
    with pytest.raises(DataError, match=r"t:1: field 'prompt': tree row has no 'prompt' message object"):
        oasst_conversations([(1, {"message_tree_id": "x", "prompt": None})], S9, where="t")
    with pytest.raises(DataError, match=r"m:2: field 'labels': message a: unreadable labels"):
        oasst_conversations([(1, msg("r", None, "prompter")), (2, msg("a", "r", "assistant", quality="high"))],
                            S9, where="m")
