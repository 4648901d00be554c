"""The attribute schema: which attributes exist, in which order, on which scale.

One `AttributeSchema` travels with every dataset, checkpoint and label file (as
`attribute_schema.json`). Loading something whose schema differs from the one in use is an
error, never a guess: a 9-head RM must not silently score a 5-attribute dataset.

Label strings are NeMo-Aligner's: ``quality:4,toxicity:0,humor:1`` (comma-separated
``name:value``; names and values contain neither ``,`` nor ``:``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import ConfigError, SchemaMismatchError  # noqa: F401 -- re-exported

SCHEMA_FILE = "attribute_schema.json"

OASST_ATTRIBUTES = ("quality", "toxicity", "humor", "creativity")
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# NeMo-Aligner's ALL_STEERLM_ATTRIBUTES (examples/nlp/data/steerlm/common.py): OASST's four, then
# HelpSteer's five. Index 4 is helpfulness, which NeMo-Aligner's BT losses hard-code.
STEERLM9_ATTRIBUTES = OASST_ATTRIBUTES + HELPSTEER2_ATTRIBUTES


@dataclass(frozen=True)
class AttributeSchema:
    """Names, order, scale and missing marker of the attributes a model predicts or follows.

    Attributes:
        name: a short identifier ("steerlm9", "helpsteer2", ...), informational only.
        attributes: attribute names in head order; output k of an RM is `attributes[k]`.
        scale_min, scale_max: the label scale (inclusive); SteerLM uses 0..4 for every attribute.
        missing: the value that marks "not annotated" in label vectors (NeMo-Aligner's -100).
    """

    name: str
    attributes: tuple[str, ...]
    scale_min: float = 0.0
    scale_max: float = 4.0
    missing: float = -100.0
    _index: dict = field(default=None, repr=False, compare=False, hash=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        attrs = tuple(self.attributes)
        object.__setattr__(self, "attributes", attrs)
        if not attrs:
            raise ValueError("an attribute schema needs at least one attribute")
        if len(set(attrs)) != len(attrs):
            raise ValueError(f"duplicate attribute names in schema {self.name!r}: {list(attrs)}")
        for a in attrs:
            if not a or any(c in a for c in ",: \n"):
                raise ValueError(f"attribute name {a!r} must be non-empty and contain no ',', ':', space or newline")
        if not self.scale_min < self.scale_max:
            raise ValueError(f"scale_min {self.scale_min} must be < scale_max {self.scale_max}")
        if self.scale_min <= self.missing <= self.scale_max:
            raise ValueError(f"missing marker {self.missing} lies inside the scale")
        object.__setattr__(self, "_index", {a: i for i, a in enumerate(attrs)})

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.attributes)

    def index(self, attribute: str) -> int:
        try:
            return self._index[attribute]
        except KeyError:
            raise KeyError(f"unknown attribute {attribute!r}; schema {self.name!r} has {list(self.attributes)}") from None

    def __contains__(self, attribute: object) -> bool:
        return attribute in self._index

    def check_value(self, attribute: str, value: float) -> float:
        """Return `value` as float if it is a number on the scale, else raise ValueError."""
        if attribute not in self._index:
            raise ValueError(f"unknown attribute {attribute!r} (schema {self.name!r}: {','.join(self.attributes)})")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"attribute {attribute!r}: value {value!r} is not a number") from None
        if math.isnan(v) or not self.scale_min <= v <= self.scale_max:
            raise ValueError(f"attribute {attribute!r}: value {value!r} is outside [{self.scale_min:g}, {self.scale_max:g}]")
        return v

    def levels(self) -> list[float]:
        """The integer levels of the scale (0..4 for SteerLM): what label strings hold after rounding."""
        return [float(v) for v in range(math.ceil(self.scale_min), math.floor(self.scale_max) + 1)]

    # ------------------------------------------------------------------ label vectors
    def to_vector(self, labels: Mapping[str, float]) -> list[float]:
        """{name: value} -> list in schema order, `missing` where absent. Validates every entry."""
        vec = [self.missing] * len(self.attributes)
        for name, value in labels.items():
            value = self.check_value(name, value)  # raises on unknown names and off-scale values
            vec[self._index[name]] = value
        return vec

    def from_vector(self, vector: Sequence[float]) -> dict[str, float]:
        """list in schema order -> {name: value}, dropping missing entries."""
        if len(vector) != len(self.attributes):
            raise ValueError(f"label vector has {len(vector)} entries, schema {self.name!r} has {len(self.attributes)}")
        return {a: float(v) for a, v in zip(self.attributes, vector) if float(v) != self.missing}

    # ------------------------------------------------------------------ label strings
    def parse_label(self, text: str) -> dict[str, float]:
        """Parse ``name:value,...`` into {name: value}; validates names, values and duplicates."""
        out: dict[str, float] = {}
        text = text.strip()
        if not text:
            return out
        for part in text.split(","):
            if part.count(":") != 1:
                raise ValueError(f"label part {part!r} is not 'name:value'")
            name, value = (s.strip() for s in part.split(":"))
            if name in out:
                raise ValueError(f"attribute {name!r} appears twice in label {text!r}")
            out[name] = self.check_value(name, value)
        return out

    def format_label(self, labels: Mapping[str, float], *, round_values: bool = True) -> str:
        """{name: value} -> ``name:value,...`` in schema order; absent attributes are omitted.

        With `round_values`, values are clipped to the scale and rounded to integers, which is
        what NeMo-Aligner's annotator writes and what AC-SFT conditions on.
        """
        for name in labels:
            if name not in self._index:
                raise ValueError(f"unknown attribute {name!r} (schema {self.name!r}: {','.join(self.attributes)})")
        parts = []
        for a in self.attributes:
            if a in labels:
                v = float(labels[a])
                if round_values:
                    parts.append(f"{a}:{int(round(min(self.scale_max, max(self.scale_min, v))))}")
                else:
                    parts.append(f"{a}:{self.check_value(a, v):g}")
        return ",".join(parts)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "attributes": list(self.attributes),
            "scale": [self.scale_min, self.scale_max],
            "missing": self.missing,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "AttributeSchema":
        scale = d.get("scale", [0.0, 4.0])
        return cls(d["name"], tuple(d["attributes"]), float(scale[0]), float(scale[1]), float(d.get("missing", -100.0)))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `attribute_schema.json` into `directory` (atomically)."""
        path = Path(directory) / SCHEMA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike) -> "AttributeSchema":
        p = Path(directory_or_file)
        if p.is_dir():
            p = p / SCHEMA_FILE
        if not p.exists():
            raise FileNotFoundError(f"{p}: no attribute schema here (every steerlm checkpoint and label file has one)")
        return cls.from_dict(json.loads(p.read_text()))

    def same_as(self, other: "AttributeSchema") -> bool:
        """Same attributes in the same order on the same scale (the name may differ)."""
        return (self.attributes, self.scale_min, self.scale_max, self.missing) == (
            other.attributes, other.scale_min, other.scale_max, other.missing)

    def require_same(self, other: "AttributeSchema", *, what: str, other_what: str) -> None:
        if not self.same_as(other):
            raise SchemaMismatchError(
                f"attribute schema mismatch: {what} has {self.name!r} {list(self.attributes)} "
                f"scale [{self.scale_min:g},{self.scale_max:g}], {other_what} has {other.name!r} "
                f"{list(other.attributes)} scale [{other.scale_min:g},{other.scale_max:g}]")


BUILTIN_SCHEMAS = {
    "steerlm9": AttributeSchema("steerlm9", STEERLM9_ATTRIBUTES),
    "helpsteer2": AttributeSchema("helpsteer2", HELPSTEER2_ATTRIBUTES),
    "oasst": AttributeSchema("oasst", OASST_ATTRIBUTES),
}


def get_schema(spec: "str | Mapping | AttributeSchema") -> AttributeSchema:
    """A built-in name, a path to a schema JSON / directory, a dict, or a schema."""
    if isinstance(spec, AttributeSchema):
        return spec
    if isinstance(spec, Mapping):
        if "attributes" not in spec:
            raise ValueError(f"schema mapping needs 'attributes': {dict(spec)}")
        return AttributeSchema.from_dict({"name": spec.get("name", "custom"), **spec})
    if spec in BUILTIN_SCHEMAS:
        return BUILTIN_SCHEMAS[spec]
    if os.path.exists(spec):
        return AttributeSchema.load(spec)
    raise ConfigError(f"schema={spec!r}: unknown attribute schema; use one of {sorted(BUILTIN_SCHEMAS)}, a JSON path, "
                      "or a dict")


def weights_vector(schema: AttributeSchema, weights: "Mapping[str, float] | Sequence[float]",
                   reference: Iterable[str] = STEERLM9_ATTRIBUTES) -> list[float]:
    """Scalarization weights in schema order.

    `weights` is either {name: w} or a list aligned with `reference` (NeMo-Aligner publishes its
    vectors over the steerlm9 order). Attributes the schema lacks must have weight 0.
    """
    if isinstance(weights, Mapping):
        named = dict(weights)
    else:
        ref = list(reference)
        if len(weights) != len(ref):
            raise ValueError(f"weights list has {len(weights)} entries, the reference order {ref} has {len(ref)}")
        named = dict(zip(ref, (float(w) for w in weights)))
    for name, w in named.items():
        if name not in schema and w != 0:
            raise ValueError(f"weight {w} on attribute {name!r}, which schema {schema.name!r} does not have")
    return [float(named.get(a, 0.0)) for a in schema.attributes]
