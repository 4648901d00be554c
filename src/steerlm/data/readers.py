"""Read raw rows from local files or the Hugging Face hub, each with its 1-based line/row number.

Every loader in `steerlm.data` reads through here, so every bad row can be reported as
``file:line: field 'x': what is wrong`` (see `steerlm.errors.DataError`).

Local formats: ``.jsonl`` / ``.jsonl.gz`` (one object per line), ``.json`` / ``.json.gz`` (a list of
objects, or JSON Lines as HF `datasets` also accepts), ``.parquet``. Anything else that does not
exist locally but looks like ``owner/name`` is a hub dataset id.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from typing import Iterator, Optional

from ..errors import DataError

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
DATA_SUFFIXES = JSON_SUFFIXES + (".parquet",)
# HF repo ids: "owner/name", letters, digits, '-', '_', '.'; a name ending in a data-file suffix is
# a mistyped local path, not a hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(path: str) -> bool:
    """True for ``owner/name`` strings that are not plausibly local file paths."""
    p = str(path)
    return bool(_HUB_ID.match(p)) and not p.lower().endswith(DATA_SUFFIXES + (".gz", ".txt", ".csv"))


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:120] if str(err) else type(err).__name__


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: a key twice in one object is an error (json would keep the last value silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def loads_strict(text: str | bytes, path: str, line: Optional[int]):
    """json.loads that refuses duplicate keys; errors are DataErrors naming path:line (and the key)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(path, line if line is not None else e.lineno, None,
                        f"malformed JSON: {e.msg} (column {e.colno})") from None
    except DuplicateKey as e:
        raise DataError(path, line, e.key, "the key appears twice in one object (which value is meant?)") from None


def _parse_object(text: str, path: str, line: int) -> dict:
    obj = loads_strict(text, path, line)
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _iter_json_lines(path: str, opener) -> Iterator[tuple[int, dict]]:
    line_no = 0
    try:
        # bytes, decoded line by line: a text stream decodes ahead in blocks, so a bad byte would be
        # reported at the line being parsed, not the one that holds it
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                text = raw.decode("utf-8")
                if text.strip():  # blank lines (e.g. a trailing one) are not records
                    yield line_no, _parse_object(text, path, line_no)
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, None, f"not UTF-8 text: {_short(e)}") from None
    except (OSError, EOFError) as e:  # a truncated gzip stream fails at the line after the last whole one
        raise DataError(path, line_no + 1, None, f"cannot read: {_short(e)}") from None


def _iter_json_file(path: str, opener) -> Iterator[tuple[int, dict]]:
    """A ``.json`` file: a list of objects (numbered by position), else JSON Lines."""
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(path, None, None, f"cannot read: {_short(e)}") from None
    if not text.lstrip().startswith("["):
        yield from _iter_json_lines(path, opener)
        return
    items = loads_strict(text, path, None)
    for i, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise DataError(path, i, None, f"list item is a {type(obj).__name__}, expected a JSON object")
        yield i, obj


def _iter_parquet(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(path, None, None, f"cannot read parquet: {_short(e)}") from None
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line or row number, 1-based; object) from a local data file.

    Raises DataError on a malformed or non-object line, and DataError(path, None, None,
    "no records") for a file without any record.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    name = path.lower()
    opener = gzip.open if name.endswith(".gz") else open
    if name.endswith((".jsonl", ".jsonl.gz")):
        records = _iter_json_lines(path, opener)
    elif name.endswith((".json", ".json.gz")):
        records = _iter_json_file(path, opener)
    elif name.endswith(".parquet"):
        records = _iter_parquet(path)
    else:
        raise DataError(path, None, None, f"unsupported file type; use one of {', '.join(DATA_SUFFIXES)}")
    return _non_empty(path, records)


def _non_empty(source: str, records: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    n = 0
    for n, rec in enumerate(records, start=1):
        yield rec
    if n == 0:
        raise DataError(source, None, None, "no records")


def hub_source_name(hub_id: str, split: str, data_dir: Optional[str] = None) -> str:
    """How hub rows are named in errors and stats: ``hf:owner/name/data_dir[split]``."""
    return f"hf:{hub_id}{'/' + data_dir if data_dir else ''}[{split}]"


def load_hub_rows(hub_id: str, split: str, data_dir: Optional[str] = None,
                  revision: Optional[str] = None) -> Iterator[tuple[int, dict]]:
    """Yield (row number, 1-based; row dict) of one split of a hub dataset.

    Uses `datasets.load_dataset` without remote code: only data files are read, never a script.
    """
    import datasets

    kwargs = {"split": split}
    if data_dir:
        kwargs["data_dir"] = data_dir
    if revision:
        kwargs["revision"] = revision
    ds = datasets.load_dataset(hub_id, **kwargs)
    rows = ((i, dict(row)) for i, row in enumerate(ds, start=1))
    return _non_empty(hub_source_name(hub_id, split, data_dir), rows)


def open_rows(path: str | os.PathLike, split: Optional[str] = None, data_dir: Optional[str] = None,
              revision: Optional[str] = None) -> tuple[str, bool, Iterator[tuple[int, dict]]]:
    """Resolve `path` to (source name, is_hub, rows): a local file if it exists, else a hub id.

    `split` defaults to "train" on the hub; for local files split/data_dir/revision do not apply.
    """
    p = os.fspath(path)
    if os.path.exists(p):
        if os.path.isdir(p):
            raise FileNotFoundError(f"{p}: is a directory; give a data file ({', '.join(DATA_SUFFIXES)})")
        return p, False, read_records(p)
    if looks_like_hub_id(p):
        split = split or "train"
        return hub_source_name(p, split, data_dir), True, load_hub_rows(p, split, data_dir, revision)
    raise FileNotFoundError(f"{p}: no such local file, and not a hub dataset id of the form 'owner/name'")
