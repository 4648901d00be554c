"""Corpus, part 2: bad data at the error boundary (issue 21).

Each case writes a small file, loads it through the data layer behind `cli.stage_entry` (the boundary every
recipe uses) and asserts exit code 2 and exactly one `steerlm: error:` line naming file:line and field. One
case runs the real SFT recipe on the tiny model: a conversation that opens with the assistant's turn used to
end in a traceback naming no file or line.
"""

from __future__ import annotations

import gzip
import json
import sys

import pytest
from omegaconf import OmegaConf

from conftest import assert_one_error, run_recipe, tiny_sft_overrides
from steerlm import cli
from steerlm.attributes import BUILTIN_SCHEMAS
from steerlm.data.sources import load_conversations, load_mixture

S9 = BUILTIN_SCHEMAS["steerlm9"]
USER, ASSISTANT = {"role": "user", "content": "hi", "labels": None}, \
    {"role": "assistant", "content": "hello", "labels": {"helpfulness": 2.0}}
CHAT = {"system": "Be brief.", "mask": "User", "type": "VALUE_TO_TEXT",
        "conversations": [{"from": "User", "value": "Why?", "label": None},
                          {"from": "Assistant", "value": "Because.", "label": "helpfulness:3"}]}


def canon(i: int, turns=None) -> dict:
    return {"id": f"c/{i}", "group": f"g/{i}", "system": None, "source": "t", "turns": turns or [USER, ASSISTANT]}


def chat(**changes) -> str:
    return json.dumps({**CHAT, **changes})


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# case -> (format, file name, text, fragment after "<file>")
CASES = {
    "duplicate_key": ("canonical", "c.jsonl", lines(canon(1), '{"id": "c/2", "id": "c/3", "group": "g", "turns": []}'),
                      ":2: field 'id': the key appears twice in one object"),
    "duplicate_nested_key": ("nemo_chat", "chat.jsonl",
                             lines(chat(), chat()[:-1] + ', "conversations": []}'),
                             ":2: field 'conversations': the key appears twice"),
    "assistant_first_canonical": ("canonical", "c.jsonl", lines(canon(1), canon(2, [ASSISTANT, USER, ASSISTANT])),
                                  ":2: field 'turns[0].role': a conversation must start with a user turn"),
    "assistant_first_nemo_chat": ("nemo_chat", "chat.jsonl",
                                  lines(chat(), chat(conversations=CHAT["conversations"][::-1])),
                                  ":2: field 'turns[0].role': a conversation must start with a user turn"),
    "nemo_mask": ("nemo_chat", "chat.jsonl", lines(chat(), chat(), chat(mask="Assistant")),
                  ":3: field 'mask': 'Assistant' is not supported; expected one of 'User'"),
    "nemo_type": ("nemo_chat", "chat.jsonl", lines(chat(type="TEXT")), ":1: field 'type': 'TEXT' is not supported"),
    "not_an_object": ("canonical", "c.jsonl", lines(canon(1), "[1, 2]"), ":2: expected a JSON object, got list"),
    "malformed_line": ("canonical", "c.jsonl", lines(canon(1), canon(2), '{"id": "c/3",'), ":3: malformed JSON"),
    "duplicate_key_json_list": ("canonical", "c.json", '[{"id": "a", "id": "b"}]',
                                ": field 'id': the key appears twice"),
}


def through_boundary(capsys, fn) -> tuple[int, str]:
    entry = cli.stage_entry(lambda cfg: fn())
    with pytest.raises(SystemExit) as e:
        entry(OmegaConf.create({}))
        sys.exit(0)
    return e.value.code, capsys.readouterr().err


def load(path, fmt: str):
    return lambda: load_mixture([{"format": fmt, "path": str(path)}], S9)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_naming_file_line_and_field(capsys, tmp_path, case):
    fmt, name, text, fragment = CASES[case]
    path = tmp_path / name
    path.write_text(text)
    code, err = through_boundary(capsys, load(path, fmt))
    assert_one_error(code, err, f"steerlm: error: {path}{fragment}")


def test_bad_utf8_is_reported_at_its_own_line(capsys, tmp_path):
    # past the text layer's read-ahead block (8 KiB): a decode error used to be blamed on an earlier line
    good = [json.dumps(canon(i)) for i in range(300)]
    path = tmp_path / "c.jsonl"
    path.write_bytes("\n".join(good).encode() + b'\n{"id": "bad\xff"}\n')
    code, err = through_boundary(capsys, load(path, "canonical"))
    assert_one_error(code, err, f"steerlm: error: {path}:301: not UTF-8 text")


def test_truncated_gzip_is_one_line(capsys, tmp_path):
    blob = gzip.compress(lines(*[canon(i) for i in range(50)]).encode())
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    code, err = through_boundary(capsys, load(path, "canonical"))
    assert_one_error(code, err, f"steerlm: error: {path}:", "cannot read")


def test_duplicate_key_in_a_labeled_parquet_turns_column(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "labeled.parquet"
    turns = '[{"role": "user", "content": "hi", "content": "again", "labels": null}]'
    pq.write_table(pa.table({"id": ["a"], "group": ["g"], "system": [None], "source": ["s"], "turns_json": [turns]}),
                   path)
    code, err = through_boundary(capsys, load(path, "canonical"))
    assert_one_error(code, err, f"steerlm: error: {path}:1: field 'turns_json': the key appears twice")


def test_duplicate_key_in_a_prompts_file(capsys, tmp_path):
    from steerlm.steerable import read_prompts_file

    path = tmp_path / "p.jsonl"
    path.write_text(lines({"prompt": "a"}, '{"prompt": "b", "prompt": "c"}'))
    code, err = through_boundary(capsys, lambda: read_prompts_file(str(path), S9))
    assert_one_error(code, err, f"steerlm: error: {path}:2: field 'prompt': the key appears twice")


def test_fractional_attribute_request_is_refused_not_rounded(capsys):
    from steerlm.steerable import resolve_attributes

    card = {"steerable_attributes": ["verbosity"], "default_attributes": {"verbosity": 2}}
    assert resolve_attributes(card, S9, {"verbosity": 3}) == {"verbosity": 3.0}
    code, err = through_boundary(capsys, lambda: resolve_attributes(card, S9, {"verbosity": 2.5}))
    assert_one_error(code, err, "attribute 'verbosity': value 2.5 is not a level of the scale")


def test_fractional_training_label_is_refused_by_sft(capsys, tmp_path):
    from steerlm.stages.sft_data import encode_examples

    conv = canon(1, [USER, {**ASSISTANT, "labels": {"verbosity": 2.5}}])
    code, err = through_boundary(capsys, lambda: encode_examples([conv], None, None, S9, max_length=64,
                                                                 over_length="skip", where="d.jsonl"))
    # checked before anything is tokenized: the encoder is never reached (fmt/tokenizer are None here)
    assert_one_error(code, err, "steerlm: error: d.jsonl: field 'conversation c/1 turns[1].labels.verbosity': "
                                "2.5 is not an integer level")


def test_fractional_labels_are_kept_as_is_for_the_reward_model(tmp_path):
    # the RM regresses the value: 2.5 is data, not a level, and stays exactly 2.5
    path = tmp_path / "c.jsonl"
    path.write_text(lines(canon(1, [USER, {**ASSISTANT, "labels": {"helpfulness": 2.5}}])))
    convs, _ = load_conversations({"format": "canonical", "path": str(path)}, S9)
    assert convs[0]["turns"][1]["labels"] == {"helpfulness": 2.5}


def test_sft_on_a_conversation_that_opens_with_the_assistant_is_one_line(tiny_model_dir, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(lines(canon(1), canon(2), canon(3, [ASSISTANT, USER, ASSISTANT])))
    run_dir = tmp_path / "sft"
    overrides = [o for o in tiny_sft_overrides(tiny_model_dir, run_dir) if not o.startswith("data.train")]
    proc = run_recipe("train_sft", *overrides, f"data.train=[{{format: canonical, path: '{path}'}}]",
                      check=False, timeout=300)
    assert_one_error(proc.returncode, proc.stderr, f"steerlm: error: {path}:3: field 'turns[0].role'")
    assert not (run_dir / "model").exists() and not (run_dir / "checkpoints").exists()
