"""Raw record reading: file types, line numbers, one-line DataErrors, hub dispatch (no network)."""

import gzip
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steerlm.data import readers
from steerlm.data.readers import looks_like_hub_id, open_rows, read_records
from steerlm.errors import DataError

ROWS = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}, {"a": 3, "b": "z"}]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "json", "json.gz", "parquet", "json-lines.json"])
def test_every_file_type_gives_the_same_numbered_records(tmp_path, suffix):
    path = tmp_path / f"d.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif suffix.startswith("json-lines"):
        write_jsonl(path, ROWS)  # HF datasets also accepts JSON Lines under .json
    elif suffix.startswith("json."):
        with gzip.open(path, "wt") as f:
            json.dump(ROWS, f, indent=2)
    elif suffix == "json":
        path.write_text(json.dumps(ROWS, indent=2))
    else:
        write_jsonl(path, ROWS, gzip.open if suffix.endswith(".gz") else open)
    assert list(read_records(path)) == [(1, ROWS[0]), (2, ROWS[1]), (3, ROWS[2])]


def test_blank_lines_are_not_records_but_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n\n')
    assert list(read_records(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError) as e:
        list(read_records(path))
    msg = one_line_error(e)
    assert msg.startswith(f"{path}:3: malformed JSON:")
    assert e.value.line == 3


def test_malformed_line_in_gzip_file(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: malformed JSON"):
        list(read_records(path))


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "3"])
def test_non_object_line_is_an_error(tmp_path, line):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=r":2: expected a JSON object"):
        list(read_records(path))


def test_json_list_with_a_non_object_item(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}, 7]')
    with pytest.raises(DataError, match=r"d\.json:2: list item is a int"):
        list(read_records(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_has_no_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        list(read_records(path))
    assert one_line_error(e) == f"{path}: no records"


def test_empty_json_list_and_parquet(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), tmp_path / "e.parquet")
    for name in ("e.json", "e.parquet"):
        with pytest.raises(DataError, match="no records"):
            list(read_records(tmp_path / name))


def test_unsupported_suffix_and_missing_file(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_hub_id_recognition():
    assert looks_like_hub_id("nvidia/HelpSteer2")
    assert looks_like_hub_id("OpenAssistant/oasst1")
    assert not looks_like_hub_id("data/train.jsonl")  # a mistyped local path, not a hub id
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("train.jsonl")
    assert not looks_like_hub_id("/abs/path")


def test_missing_local_path_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local file"):
        open_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="not a hub dataset id"):
        open_rows("data/nope.jsonl")


def test_hub_ids_go_through_load_dataset_without_remote_code(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return [{"prompt": "p", "n": i} for i in range(3)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    where, is_hub, rows = open_rows("nvidia/HelpSteer2", split="validation", data_dir="preference", revision="abc")
    assert is_hub and where == "hf:nvidia/HelpSteer2/preference[validation]"
    assert calls == [("nvidia/HelpSteer2", {"split": "validation", "data_dir": "preference", "revision": "abc"})]
    assert [n for n, _ in rows] == [1, 2, 3]
    assert list(readers.load_hub_rows("o/n", "train"))[0] == (1, {"prompt": "p", "n": 0})
    assert "trust_remote_code" not in calls[-1][1]


def test_empty_hub_split_has_no_records(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda path, **kw: []))
    with pytest.raises(DataError, match=r"hf:o/n\[train\]: no records"):
        list(readers.load_hub_rows("o/n", "train"))
