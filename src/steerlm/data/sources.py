"""One entry point from a data spec (config mapping) to validated canonical data plus counts.

A spec names one source::

    {"format": "helpsteer2" | "oasst" | "nemo_chat" | "nemo_regression" | "canonical",
     "path": "local/file.jsonl[.gz] | .json | .parquet" or a hub id "owner/name",
     "split": hub split (default "train"); for HelpSteer2 preference rows, their `split` field,
     "data_dir": hub data_dir, "revision": hub revision, "max_rows": read at most this many rows,
     "name": id prefix (default per format), "attributes": rating columns to keep (helpsteer2,
     oasst), "lang": OASST language filter (e.g. "en")}

Every loader returns (items, stats); stats = {source, format, rows_read, kept, skipped: {reason:
count}, ...} so callers can report exactly what was read and what was left out, and why.
"""

from __future__ import annotations

import json

import itertools
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

from ..attributes import AttributeSchema
from ..errors import ConfigError, DataError
from .helpsteer2 import PREFERENCE_DATA_DIR, helpsteer2_conversations, helpsteer2_preference_pairs
from .nemo import nemo_chat_conversations, nemo_regression_conversations
from .oasst import oasst_conversations, oasst_preference_pairs
from .readers import loads_strict, open_rows
from .schema import Conversation, PreferencePair, ROLES, validate_conversation

FORMATS = ("helpsteer2", "oasst", "nemo_chat", "nemo_regression", "canonical")
PAIR_FORMATS = ("helpsteer2", "oasst", "canonical")
SPEC_KEYS = {"format", "path", "split", "data_dir", "revision", "max_rows", "name", "attributes", "lang"}


def check_spec(spec: Mapping, formats: tuple = FORMATS, where: str = "data spec") -> dict:
    """A source spec's keys and values, checked before anything is read (ConfigError naming `where`)."""
    spec = dict(spec)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if spec.get("format") not in formats:
        raise ConfigError(f"{where} format {spec.get('format')!r} is not one of {formats}")
    if not spec.get("path"):
        raise ConfigError(f"{where} {spec} has no 'path'")
    max_rows = spec.get("max_rows")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"{where} max_rows must be a positive integer, got {max_rows!r}")
    for key, fmts in (("attributes", ("helpsteer2", "oasst")), ("lang", ("oasst",))):
        if spec.get(key) is not None and spec["format"] not in fmts:
            raise ConfigError(f"{where} key {key!r} applies only to formats {fmts}")
    if spec.get("name") is not None and spec["format"] == "canonical":
        raise ConfigError(f"{where} 'name' does not apply to format 'canonical' (rows carry their own ids)")
    return spec


def _open(spec: dict, *, hub_split: Optional[str] = None, data_dir: Optional[str] = None,
          split_filters_rows: bool = False):
    """(where, is_hub, rows) for a spec, truncated to max_rows. A `split` on a local file is an error
    unless the rows themselves carry a split field (`split_filters_rows`)."""
    split = hub_split or spec.get("split")
    where, is_hub, rows = open_rows(spec["path"], split=split, data_dir=spec.get("data_dir") or data_dir,
                                    revision=spec.get("revision"))
    if not is_hub and spec.get("split") and not split_filters_rows:
        raise ConfigError(f"{where}: 'split' selects a hub split; this is a local file (drop 'split')")
    if spec.get("max_rows"):
        rows = itertools.islice(rows, spec["max_rows"])
    return where, is_hub, rows


def _default_prefix(spec: dict, base: Optional[str], is_hub: bool) -> str:
    if spec.get("name"):
        return spec["name"]
    if base is None:  # nemo files: the file name without its suffixes
        base = os.path.basename(str(spec["path"])).split(".")[0] or spec["format"]
    return f"{base}/{spec.get('split') or 'train'}" if is_hub else base


def _finish(stats: dict, spec: dict) -> dict:
    if spec.get("max_rows"):
        stats["max_rows"] = spec["max_rows"]
    return stats


def _canonical_conversations(rows, schema, where) -> tuple[list, dict]:
    convs, line_of = [], {}
    for line, row in rows:
        if "turns" not in row and isinstance(row.get("turns_json"), str):  # labeled parquet (stage 2)
            try:
                row = {**row, "turns": loads_strict(row["turns_json"], where, line)}
            except DataError as e:
                raise DataError(where, line, "turns_json", e.message) from None
        conv = validate_conversation(row, schema, where=where, line=line)
        if conv["id"] in line_of:
            raise DataError(where, line, "id", f"duplicate id {conv['id']!r} (first on line {line_of[conv['id']]})")
        line_of[conv["id"]] = line
        convs.append(conv)
    return convs, {"source": where, "format": "canonical", "rows_read": len(convs), "kept": len(convs), "skipped": {}}


def load_conversations(spec: Mapping, schema: AttributeSchema) -> tuple[list[Conversation], dict]:
    """Load one source as validated canonical conversations; returns (conversations, stats)."""
    spec = check_spec(spec, FORMATS)
    fmt = spec["format"]
    where, is_hub, rows = _open(spec)
    if fmt == "helpsteer2":
        kw = {"attributes": tuple(spec["attributes"])} if spec.get("attributes") else {}
        convs, stats = helpsteer2_conversations(rows, schema, where=where,
                                                id_prefix=_default_prefix(spec, "helpsteer2", is_hub), **kw)
    elif fmt == "oasst":
        kw = {"attributes": tuple(spec["attributes"])} if spec.get("attributes") else {}
        convs, stats = oasst_conversations(rows, schema, where=where, lang=spec.get("lang"),
                                           id_prefix=spec.get("name") or "oasst1", **kw)
    elif fmt == "nemo_chat":
        convs, stats = nemo_chat_conversations(rows, schema, where=where,
                                               id_prefix=_default_prefix(spec, None, is_hub))
    elif fmt == "nemo_regression":
        convs, stats = nemo_regression_conversations(rows, schema, where=where,
                                                     id_prefix=_default_prefix(spec, None, is_hub))
    else:
        convs, stats = _canonical_conversations(rows, schema, where)
    return convs, _finish(stats, spec)


def validate_preference_pair(pair: dict, *, where: str, line: Optional[int]) -> PreferencePair:
    """Check a canonical preference pair; raise a one-line DataError naming the field."""
    for k in ("id", "group", "source", "chosen", "rejected"):
        if not isinstance(pair.get(k), str) or not pair[k].strip():
            raise DataError(where, line, k, f"missing or empty {k!r}")
    context = pair.get("context")
    if not isinstance(context, list) or not context:
        raise DataError(where, line, "context", "missing or empty list of turns")
    for i, t in enumerate(context):
        if not isinstance(t, dict) or t.get("role") not in ROLES:
            raise DataError(where, line, f"context[{i}].role", f"expected a turn with role in {ROLES}")
        if not isinstance(t.get("content"), str) or not t["content"].strip():
            raise DataError(where, line, f"context[{i}].content", "missing or empty text")
    if context[-1]["role"] != "user":
        raise DataError(where, line, "context", "the context must end with a user turn")
    strength = pair.get("strength")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or math.isnan(strength) or strength < 0:
        raise DataError(where, line, "strength", f"expected a number >= 0, got {strength!r}")
    system = pair.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(where, line, "system", f"expected a string or null, got {type(system).__name__}")
    return {"id": pair["id"], "group": pair["group"], "system": system,
            "context": [{"role": t["role"], "content": t["content"], "labels": None} for t in context],
            "chosen": pair["chosen"], "rejected": pair["rejected"], "strength": float(strength),
            "source": pair["source"]}


def load_preference_pairs(spec: Mapping, schema: Optional[AttributeSchema] = None) -> tuple[list[PreferencePair], dict]:
    """Load one source as preference pairs; returns (pairs, stats).

    helpsteer2: the hub `preference` data_dir (its one hub split, filtered by the rows' `split`
    field when the spec gives `split`) or a local preference file; oasst: ranked sibling replies;
    canonical: JSONL of pairs. `schema` is accepted for a uniform call signature (pairs carry no labels).
    """
    spec = check_spec(spec, PAIR_FORMATS)
    fmt = spec["format"]
    if fmt == "helpsteer2":
        where, is_hub, rows = _open(spec, hub_split="train", data_dir=PREFERENCE_DATA_DIR, split_filters_rows=True)
        pairs, stats = helpsteer2_preference_pairs(rows, where=where, split=spec.get("split"),
                                                   id_prefix=spec.get("name") or "helpsteer2-preference")
    elif fmt == "oasst":
        where, _, rows = _open(spec)
        pairs, stats = oasst_preference_pairs(rows, where=where, lang=spec.get("lang"),
                                              id_prefix=spec.get("name") or "oasst1")
    else:
        where, _, rows = _open(spec)
        pairs, line_of = [], {}
        for line, row in rows:
            pair = validate_preference_pair(row, where=where, line=line)
            if pair["id"] in line_of:
                raise DataError(where, line, "id", f"duplicate id {pair['id']!r} (first on line {line_of[pair['id']]})")
            line_of[pair["id"]] = line
            pairs.append(pair)
        stats = {"source": where, "format": "canonical", "rows_read": len(pairs), "kept": len(pairs), "skipped": {}}
    return pairs, _finish(stats, spec)


def load_mixture(specs: Iterable[Mapping], schema: AttributeSchema, *, kind: str = "conversations") -> tuple[list, dict]:
    """Load and concatenate several sources; ids must be unique across all of them.

    kind: "conversations" or "pairs". Returns (items, {"sources": [stats per spec], "total": n}).
    """
    loaders = {"conversations": load_conversations, "pairs": load_preference_pairs}
    if kind not in loaders:
        raise ValueError(f"kind must be one of {sorted(loaders)}, got {kind!r}")
    specs = list(specs)
    if not specs:
        raise ConfigError("a data mixture needs at least one source spec")
    items, per_source, seen = [], [], {}
    for spec in specs:
        got, stats = loaders[kind](spec, schema)
        for item in got:
            if item["id"] in seen:
                raise DataError(stats["source"], None, "id", f"duplicate id {item['id']!r}, also in "
                                                             f"{seen[item['id']]}; give one spec a distinct 'name'")
            seen[item["id"]] = stats["source"]
        items.extend(got)
        per_source.append(stats)
    return items, {"sources": per_source, "total": len(items)}


def describe_stats(stats: dict) -> str:
    """Human-readable lines, one per source: ``source (format): read N, kept K, skipped {...}``."""
    sources = stats["sources"] if "sources" in stats else [stats]
    lines = []
    for s in sources:
        skipped = ", ".join(f"{k} {v}" for k, v in s.get("skipped", {}).items() if v) or "none"
        lines.append(f"{s['source']} ({s['format']}): read {s['rows_read']} rows, kept {s['kept']}, skipped: {skipped}")
    return "\n".join(lines)


def require_input_schemas(specs: Iterable[Mapping], schema: AttributeSchema, *, other_what: str) -> None:
    """A source whose directory carries an `attribute_schema.json` (a steerlm label output) must use `schema`."""
    from ..attributes import SCHEMA_FILE

    for spec in specs:
        sibling = Path(str(spec.get("path", ""))).parent / SCHEMA_FILE
        if spec.get("path") and sibling.exists():
            AttributeSchema.load(sibling).require_same(schema, what=f"input {spec['path']}", other_what=other_what)
