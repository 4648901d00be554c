"""AttributeSchema: built-in schemas, NeMo label strings, label vectors, persistence, weights."""

from __future__ import annotations

import json

import pytest

from steerlm.attributes import (BUILTIN_SCHEMAS, SCHEMA_FILE, AttributeSchema, SchemaMismatchError, get_schema,
                                weights_vector)

S9 = get_schema("steerlm9")
HS2 = get_schema("helpsteer2")
OASST = get_schema("oasst")


# ------------------------------------------------------------------ built-in schemas
def test_steerlm9_is_nemo_aligners_all_steerlm_attributes_in_order():
    """NeMo-Aligner's ALL_STEERLM_ATTRIBUTES = OASST's four, then HelpSteer's five; index 4 = helpfulness."""
    assert S9.attributes == ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness",
                             "coherence", "complexity", "verbosity")
    assert S9.index("helpfulness") == 4
    assert (S9.scale_min, S9.scale_max, S9.missing) == (0.0, 4.0, -100.0)


def test_helpsteer2_and_oasst_schemas():
    assert HS2.attributes == ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    assert OASST.attributes == ("quality", "toxicity", "humor", "creativity")
    assert set(BUILTIN_SCHEMAS) == {"steerlm9", "helpsteer2", "oasst"}
    for s in BUILTIN_SCHEMAS.values():
        assert (s.scale_min, s.scale_max, s.missing) == (0.0, 4.0, -100.0)
    assert len(S9) == 9 and len(HS2) == 5 and len(OASST) == 4
    assert "humor" in S9 and "humor" not in HS2


def test_index_of_unknown_attribute_names_the_schema():
    with pytest.raises(KeyError, match="helpfullness"):
        S9.index("helpfullness")


@pytest.mark.parametrize("kwargs, match", [
    (dict(attributes=()), "at least one"),
    (dict(attributes=("a", "b", "a")), "duplicate"),
    (dict(attributes=("a,b",)), "must be non-empty"),
    (dict(attributes=("a:b",)), "must be non-empty"),
    (dict(attributes=("",)), "must be non-empty"),
    (dict(attributes=("a",), scale_min=4.0, scale_max=0.0), "scale_min"),
    (dict(attributes=("a",), missing=2.0), "inside the scale"),
])
def test_invalid_schemas_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttributeSchema("bad", **kwargs)


# ------------------------------------------------------------------ label strings
def test_parse_label_reads_nemo_strings():
    assert S9.parse_label("quality:4,toxicity:0,helpfulness:3.5") == {"quality": 4.0, "toxicity": 0.0,
                                                                      "helpfulness": 3.5}
    assert S9.parse_label(" humor : 1 , verbosity:2 ") == {"humor": 1.0, "verbosity": 2.0}
    assert S9.parse_label("") == {} and S9.parse_label("   ") == {}
    assert all(isinstance(v, float) for v in S9.parse_label("quality:4,humor:0").values())


def test_format_label_writes_schema_order_whatever_the_dict_order():
    labels = {"verbosity": 1, "quality": 4, "helpfulness": 3}
    assert S9.format_label(labels) == "quality:4,helpfulness:3,verbosity:1"
    assert S9.format_label({}) == ""


def test_label_string_round_trip():
    text = "quality:4,toxicity:0,humor:1,creativity:2,helpfulness:3,correctness:4,coherence:4,complexity:1,verbosity:0"
    assert S9.format_label(S9.parse_label(text)) == text
    labels = {"helpfulness": 3.5, "coherence": 0.25}
    assert S9.parse_label(S9.format_label(labels, round_values=False)) == labels


def test_format_label_clips_then_rounds_like_nemo_aligners_annotator():
    """NeMo's attribute_annotate.py writes round(min(4, max(0, r))) with Python's round (half to even):

        4.6 -> min(4, 4.6) = 4;  -0.7 -> max(0, -0.7) = 0 -> 0;  2.5 -> 2;  3.5 -> 4;  1.49 -> 1;  0.51 -> 1
    """
    labels = {"quality": 4.6, "toxicity": -0.7, "humor": 2.5, "creativity": 3.5, "helpfulness": 1.49,
              "correctness": 0.51}
    assert S9.format_label(labels) == "quality:4,toxicity:0,humor:2,creativity:4,helpfulness:1,correctness:1"


def test_format_label_without_rounding_keeps_values_and_rejects_off_scale():
    assert S9.format_label({"helpfulness": 3.5}, round_values=False) == "helpfulness:3.5"
    with pytest.raises(ValueError, match="outside"):
        S9.format_label({"helpfulness": 4.5}, round_values=False)


def test_format_label_rejects_unknown_attribute():
    with pytest.raises(ValueError, match="unknown attribute 'niceness'"):
        HS2.format_label({"niceness": 2})
    with pytest.raises(ValueError, match="unknown attribute 'quality'"):
        HS2.format_label({"quality": 2})  # a steerlm9 name the helpsteer2 schema lacks


@pytest.mark.parametrize("text, match", [
    ("helpfullness:3", "unknown attribute 'helpfullness'"),
    ("quality:5", "outside \\[0, 4\\]"),
    ("quality:-1", "outside"),
    ("quality:4.01", "outside"),
    ("quality:nan", "outside"),
    ("quality:abc", "not a number"),
    ("quality:1,quality:2", "appears twice"),
    ("quality", "is not 'name:value'"),
    ("quality:1:2", "is not 'name:value'"),
    ("quality:1,", "is not 'name:value'"),
    ("quality:1;humor:2", "is not 'name:value'"),
])
def test_parse_label_errors(text, match):
    with pytest.raises(ValueError, match=match):
        S9.parse_label(text)


def test_parse_label_accepts_scale_endpoints():
    assert S9.parse_label("quality:0,humor:4") == {"quality": 0.0, "humor": 4.0}


# ------------------------------------------------------------------ label vectors
def test_to_vector_marks_missing_and_from_vector_drops_it():
    vec = HS2.to_vector({"coherence": 3, "helpfulness": 4, "verbosity": 0})
    assert vec == [4.0, -100.0, 3.0, -100.0, 0.0]  # 0 is a label, not "missing"
    assert HS2.from_vector(vec) == {"helpfulness": 4.0, "coherence": 3.0, "verbosity": 0.0}
    assert HS2.to_vector({}) == [-100.0] * 5
    assert HS2.from_vector([-100.0] * 5) == {}


def test_vector_with_a_custom_missing_marker():
    s = AttributeSchema("custom", ("a", "b", "c"), scale_min=1.0, scale_max=5.0, missing=-1.0)
    assert s.to_vector({"b": 5}) == [-1.0, 5.0, -1.0]
    assert s.from_vector([2.0, -1.0, 1.0]) == {"a": 2.0, "c": 1.0}
    with pytest.raises(ValueError, match="outside"):
        s.to_vector({"a": 0})  # below this schema's scale_min


def test_vector_errors():
    with pytest.raises(ValueError, match="unknown attribute 'quality'"):
        HS2.to_vector({"quality": 1})
    with pytest.raises(ValueError, match="outside"):
        HS2.to_vector({"helpfulness": 7})
    with pytest.raises(ValueError, match="4 entries, schema 'helpsteer2' has 5"):
        HS2.from_vector([1, 2, 3, 4])


# ------------------------------------------------------------------ persistence
def test_save_and_load_round_trip(tmp_path):
    s = AttributeSchema("custom", ("b", "a"), scale_min=1.0, scale_max=7.0, missing=-1.0)
    path = s.save(tmp_path)
    assert path == tmp_path / SCHEMA_FILE
    assert json.loads(path.read_text()) == {"name": "custom", "attributes": ["b", "a"], "scale": [1.0, 7.0],
                                            "missing": -1.0}
    assert not list(tmp_path.glob("*.tmp"))
    for where in (tmp_path, path, str(path)):
        back = AttributeSchema.load(where)
        assert back == s and back.index("a") == 1
    assert get_schema(str(tmp_path)) == s


def test_load_without_schema_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=SCHEMA_FILE):
        AttributeSchema.load(tmp_path)


def test_get_schema_specs():
    assert get_schema("steerlm9") is S9
    assert get_schema(HS2) is HS2
    d = get_schema({"attributes": ["x", "y"]})
    assert d.name == "custom" and d.attributes == ("x", "y") and d.scale_max == 4.0
    with pytest.raises(ValueError, match="schema='steerlm10': unknown attribute schema"):
        get_schema("steerlm10")
    with pytest.raises(ValueError, match="needs 'attributes'"):
        get_schema({"name": "x"})


# ------------------------------------------------------------------ schema comparison
def test_require_same_raises_naming_both_sides():
    with pytest.raises(SchemaMismatchError) as e:
        S9.require_same(HS2, what="checkpoint /ckpt", other_what="this run")
    msg = str(e.value)
    assert "checkpoint /ckpt has 'steerlm9'" in msg and "this run has 'helpsteer2'" in msg
    assert "quality" in msg and "'helpfulness', 'correctness'" in msg
    assert isinstance(e.value, ValueError)


def test_require_same_compares_order_and_scale_not_name():
    S9.require_same(AttributeSchema("renamed", S9.attributes), what="a", other_what="b")  # no error
    reordered = AttributeSchema("steerlm9", S9.attributes[::-1])
    with pytest.raises(SchemaMismatchError):
        S9.require_same(reordered, what="a", other_what="b")
    rescaled = AttributeSchema("steerlm9", S9.attributes, scale_max=9.0)
    with pytest.raises(SchemaMismatchError, match="scale \\[0,9\\]"):
        S9.require_same(rescaled, what="a", other_what="b")


# ------------------------------------------------------------------ scalarization weights
LLAMA3_70B_WEIGHTS = [0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4]  # NeMo-Aligner's, over steerlm9 order


def test_weights_vector_from_steerlm9_list():
    assert weights_vector(S9, LLAMA3_70B_WEIGHTS) == [0.0, 0.0, 0.0, 0.0, 0.65, 0.8, 0.45, 0.55, -0.4]
    # the same list re-aligned to a 5-attribute schema (OASST slots are 0, so they may be dropped)
    assert weights_vector(HS2, LLAMA3_70B_WEIGHTS) == [0.65, 0.8, 0.45, 0.55, -0.4]


def test_weights_vector_from_dict():
    assert weights_vector(S9, {"helpfulness": 1.0}) == [0, 0, 0, 0, 1.0, 0, 0, 0, 0]
    assert weights_vector(HS2, {"verbosity": -0.5, "helpfulness": 2}) == [2.0, 0, 0, 0, -0.5]
    assert weights_vector(HS2, {"quality": 0.0, "helpfulness": 1}) == [1.0, 0, 0, 0, 0]  # weight 0: allowed


def test_weights_on_attributes_the_schema_lacks_are_errors():
    with pytest.raises(ValueError, match="'quality'.*'helpsteer2'"):
        weights_vector(HS2, {"quality": 1.0})
    with pytest.raises(ValueError, match="'helpfullness'"):
        weights_vector(S9, {"helpfullness": 1.0})
    with pytest.raises(ValueError, match="'helpfulness'.*'oasst'"):
        weights_vector(OASST, LLAMA3_70B_WEIGHTS)  # a non-zero weight lands on a HelpSteer slot
    with pytest.raises(ValueError, match="5 entries"):
        weights_vector(S9, [1, 0, 0, 0, 0])
