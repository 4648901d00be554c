"""Bad input data through the real reward CLI: a nonzero exit, an error naming file:line and field,
and no partial model output.

The recipes end a run on bad input with exactly one stderr line,
``steerlm: error: <file>:<line>: field '<field>': <message>``, and exit code 2 (`errors.user_errors`).
"""

from __future__ import annotations

import json


import pytest

from conftest import run_recipe, tiny_reward_overrides

HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR=1"
GOOD_CHAT = {"system": "Be brief.", "mask": "User", "type": "VALUE_TO_TEXT",
             "conversations": [{"from": "User", "value": "Why is the sky blue?", "label": None},
                               {"from": "Assistant", "value": "Rayleigh scattering.",
                                "label": "helpfulness:4,correctness:3"}]}
GOOD_HS2 = {"prompt": "Name a color.", "response": "Blue.", "helpfulness": 3, "correctness": 4,
            "coherence": 4, "complexity": 1, "verbosity": 1}
GOOD_CANON = {"id": "c/1", "group": "g/1", "system": None, "source": "test",
              "turns": [{"role": "user", "content": "hi", "labels": None},
                        {"role": "assistant", "content": "hello", "labels": {"helpfulness": 2.0}}]}


def chat(label):
    row = json.loads(json.dumps(GOOD_CHAT))
    row["conversations"][1]["label"] = label
    return json.dumps(row)


def without(row, key, **changes):
    row = {k: v for k, v in row.items() if k != key}
    return json.dumps({**row, **changes})


def canon_empty_response():
    row = json.loads(json.dumps(GOOD_CANON))
    row["id"] = "c/3"
    row["turns"][1]["content"] = "   "
    return json.dumps(row)


# case -> (format, file name, lines, expected fragment of the error line after "<file>")
CASES = {
    "malformed_json": ("nemo_chat", "chat.jsonl", [json.dumps(GOOD_CHAT), json.dumps(GOOD_CHAT), '{"system": "x",'],
                       ":3: malformed JSON"),
    "unknown_attribute": ("nemo_chat", "chat.jsonl", [json.dumps(GOOD_CHAT), chat("helpfullness:4,correctness:3")],
                          ":2: field 'conversations[1].label': unknown attribute 'helpfullness'"),
    "label_out_of_range": ("nemo_chat", "chat.jsonl", [json.dumps(GOOD_CHAT), json.dumps(GOOD_CHAT),
                                                       chat("helpfulness:7")],
                           ":3: field 'conversations[1].label': attribute 'helpfulness': value '7' is outside [0, 4]"),
    "missing_prompt": ("helpsteer2", "hs2.jsonl", [json.dumps(GOOD_HS2), without(GOOD_HS2, "prompt")],
                       ":2: field 'prompt': missing or empty 'prompt' text"),
    "empty_response": ("canonical", "canon.jsonl",
                       [json.dumps(GOOD_CANON), json.dumps({**GOOD_CANON, "id": "c/2"}), canon_empty_response()],
                       ":3: field 'turns[1].content': missing or empty response text"),
    "empty_file": ("helpsteer2", "empty.jsonl", [], ": no records"),
}


@pytest.fixture(scope="module")
def run_case(tiny_model_dir, tmp_path_factory):
    """Run each case once per module: (process, data file, run_dir)."""
    cache = {}

    def run(name):
        if name not in cache:
            fmt, fname, lines, _ = CASES[name]
            d = tmp_path_factory.mktemp(name)
            data = d / fname
            data.write_text("".join(line + "\n" for line in lines))
            run_dir = d / "run"
            proc = run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, run_dir),
                              f"data.train=[{{format: {fmt}, path: '{data}'}}]", check=False,
                              env={"HYDRA_FULL_ERROR": "0"}, timeout=300)
            cache[name] = (proc, data, run_dir)
        return cache[name]

    return run


def error_line(stderr: str) -> str:
    """The last stderr line that is not Hydra's trailing hint."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[-1].startswith(HYDRA_HINT):
        lines.pop()
    return lines[-1] if lines else ""


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_file_line_and_field(run_case, case):
    proc, data, run_dir = run_case(case)
    assert proc.returncode != 0, proc.stdout[-2000:]
    line = error_line(proc.stderr)
    assert line.startswith(f"steerlm: error: {data}{CASES[case][3]}"), proc.stderr[-3000:]
    # nothing half-written: no exported model, no checkpoint
    assert not (run_dir / "model").exists() and not (run_dir / "model.tmp").exists()
    assert not (run_dir / "checkpoints").exists()


def test_bad_input_error_is_one_line_without_traceback(run_case):
    proc, data, _ = run_case("unknown_attribute")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{data}:2: field 'conversations[1].label'" in last
