"""Stage 2 (labeling) end to end through the real CLI on tiny RMs: sharding, kill -9 + resume,
over-length policies, schema checks, untrained heads, human labels, bad input, overwrite, the Python
API and parquet output.

Three tiny stage-1 RMs are trained once per module (concurrently):
  rm9          steerlm9 schema on the bundled data: all 9 heads trained
  hs2_schema   helpsteer2 schema on HelpSteer2 rows
  rm9_on_hs2   steerlm9 schema on HelpSteer2 rows only: 4 heads (the OASST ones) never trained
The shared labeling input is the first 200 OASST messages (123 conversations, 181 assistant turns)
in chunks of 4 conversations (31 chunks) with max_length=1024 (51 turns are longer with the tiny
tokenizer). To stay fast on 2 cores, CLI runs that do not depend on each other are launched two at a
time by module fixtures (`independent_runs`, `dependent_runs`); each test asserts on its own run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import PY, REPO, run_recipe, tiny_reward_overrides
from steerlm.attributes import BUILTIN_SCHEMAS, HELPSTEER2_ATTRIBUTES, OASST_ATTRIBUTES, STEERLM9_ATTRIBUTES
from steerlm.data.sources import load_conversations

OASST = "data/oasst1/oasst1_validation_en.messages.jsonl.gz"
OASST_SPEC = {"format": "oasst", "path": OASST, "max_rows": 200}
INPUT = f"input=[{{format: oasst, path: {OASST}, max_rows: 200}}]"
MAX_LENGTH = 1024
CHUNK = 4
# a score computed in another batch (other neighbours, other padding) differs by fp32 noise. On the 2-core dev machine
# (2026-12-08) it reached 1.2e-4 with OMP_NUM_THREADS=1 and 3.9e-4 (on a 0.40 score) with the default threads, at
# 0ef86a7 as after it: the tiny random RM amplifies rounding; labels still agree away from rounding edges (asserted)
FP32_BATCH_NOISE = 1e-3
COMMON = [INPUT, f"chunk_size={CHUNK}", f"max_length={MAX_LENGTH}"]
HS2_DATA = "data.train=[{format: helpsteer2, path: data/helpsteer2/helpsteer2_train_first100.jsonl}]"
NO_HINT = {"HYDRA_FULL_ERROR": "0"}
STEERLM9 = BUILTIN_SCHEMAS["steerlm9"]
# NeMo-Aligner's default system prompt, written out here so over-length counts are independent of steerlm
NEMO_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# ===== helpers ===================================================================================
def label(rm: Path, out_dir: Path, *extra: str, check: bool = True, torchrun: int = 0):
    return run_recipe("label", f"rm={rm}", f"output_dir={out_dir}", *extra, check=check, torchrun=torchrun,
                      env=NO_HINT, timeout=300)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_user_error(proc, out_dir: Path, starts: str) -> None:
    """Exit 2, no traceback, the last stderr line is the one-line error, nothing written."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = error_line(proc)
    assert line.startswith(starts), proc.stderr[-3000:]
    assert not (out_dir / "labeled.jsonl").exists() and not (out_dir / "manifest.json").exists()


def rm_input_length(tokenizer, system, turns) -> int:
    """Token count of the NeMo RM input, rendered here by hand (not with steerlm.templates)."""
    names = {"user": "User", "assistant": "Assistant"}
    text = (f"<extra_id_0>System\n{NEMO_SYSTEM if system is None else system}\n"
            + "".join(f"<extra_id_1>{names[t['role']]}\n{t['content']}\n" for t in turns) + "<extra_id_2>")
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def over_length_turns(rm: Path, conversations: list[dict], max_length: int) -> set[tuple[str, int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm)
    return {(c["id"], k) for c in conversations for k, t in enumerate(c["turns"])
            if t["role"] == "assistant" and rm_input_length(tok, c["system"], c["turns"][:k + 1]) > max_length}


def clip_round(v: float) -> float:
    return float(round(min(4.0, max(0.0, v))))


def assistant_turns(rows: list[dict]):
    for row in rows:
        for k, t in enumerate(row["turns"]):
            if t["role"] == "assistant":
                yield row, k, t


# ===== module fixtures ===========================================================================
@pytest.fixture(scope="module")
def rms(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("rms")
    extra = {"rm9": [], "hs2_schema": ["schema=helpsteer2", HS2_DATA], "rm9_on_hs2": [HS2_DATA]}
    with ThreadPoolExecutor(len(extra)) as pool:  # three small CLI runs side by side
        futures = [pool.submit(run_recipe, "train_reward", *tiny_reward_overrides(tiny_model_dir, base / name, *ex))
                   for name, ex in extra.items()]
        for f in futures:
            f.result()
    return {name: base / name / "model" for name in extra}


@pytest.fixture(scope="module")
def inputs() -> list[dict]:
    conversations, _ = load_conversations(OASST_SPEC, STEERLM9)
    return conversations


def parallel(jobs: dict, workers: int = 2) -> dict:
    """Run independent callables two at a time (CLI runs are mostly single-threaded start-up)."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def canonical_rows(n: int = 2) -> list[dict]:
    return [{"id": f"c/{i}", "group": f"g/{i}", "system": None, "source": "test",
             "turns": [{"role": "user", "content": f"Question {i}?", "labels": None},
                       {"role": "assistant", "content": f"Answer {i}.", "labels": None}]} for i in range(n)]


def write_inputs(d: Path) -> dict[str, Path]:
    """The bad inputs: a canonical file carrying the oasst schema, a chat row labeling quality, a torn line."""
    (d / "oasst_schema").mkdir()
    mismatch = d / "oasst_schema" / "convs.jsonl"
    mismatch.write_text("".join(json.dumps(r) + "\n" for r in canonical_rows()))
    BUILTIN_SCHEMAS["oasst"].save(mismatch.parent)  # a labeled file that carries the oasst schema
    good = {"system": "Be brief.", "mask": "User", "type": "VALUE_TO_TEXT",
            "conversations": [{"from": "User", "value": "Why is the sky blue?", "label": None},
                              {"from": "Assistant", "value": "Rayleigh scattering.", "label": "helpfulness:3"}]}
    bad = json.loads(json.dumps(good))
    bad["conversations"][1]["label"] = "quality:3"
    chat = d / "chat.jsonl"
    chat.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    malformed = d / "bad.jsonl"
    malformed.write_text("".join(json.dumps(r) + "\n" for r in canonical_rows()) + '{"id": "c/9", "turns": [\n')
    return {"mismatch": mismatch, "unknown_attribute": chat, "malformed": malformed}


@pytest.fixture(scope="module")
def independent_runs(rms, tmp_path_factory) -> dict[str, dict]:
    """Every run that needs only the RMs: {name: {"proc", "out", "input"}}."""
    base = tmp_path_factory.mktemp("label_runs")
    files = write_inputs(base)
    jobs = {  # name: (rm, input file or None, extra overrides)
        "reference": ("rm9", None, COMMON),  # one process, uninterrupted, over_length=skip (the default)
        "error": ("rm9", None, [*COMMON, "over_length=error"]),
        "truncate": ("rm9", None, [*COMMON, "over_length=truncate_left"]),
        "parquet": ("rm9", None, [*COMMON, "output_format=parquet"]),
        "mismatch": ("rm9", files["mismatch"], [f"input=[{{format: canonical, path: '{files['mismatch']}'}}]"]),
        "unknown_attribute": ("hs2_schema", files["unknown_attribute"],
                              [f"input=[{{format: nemo_chat, path: '{files['unknown_attribute']}'}}]"]),
        "malformed": ("rm9", files["malformed"], [f"input=[{{format: canonical, path: '{files['malformed']}'}}]"]),
    }

    def job(name, rm, path, extra):
        return lambda: {"proc": label(rms[rm], base / name, *extra, check=False), "out": base / name, "input": path}

    runs = parallel({name: job(name, *spec) for name, spec in jobs.items()})
    for name in ("reference", "truncate", "parquet"):
        proc = runs[name]["proc"]
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return runs


@pytest.fixture(scope="module")
def reference(independent_runs) -> Path:
    """The output every other run is compared to."""
    return independent_runs["reference"]["out"]


@pytest.fixture(scope="module")
def dependent_runs(rms, reference, tmp_path_factory) -> dict:
    """Runs that need the reference output: two ranks, untrained heads, overwrite + keep_human_labels."""
    base = tmp_path_factory.mktemp("dependent_runs")

    def overwrite():
        # a copy of the complete reference output: refused without overwrite, then relabeled keeping human labels
        out = base / "overwrite"
        shutil.copytree(reference, out)
        before = ((out / "labeled.jsonl").read_bytes(), (out / "labeled.jsonl").stat().st_mtime_ns)
        refused = label(rms["rm9"], out, *COMMON, "keep_human_labels=true", check=False)
        after_refusal = ((out / "labeled.jsonl").read_bytes(), (out / "labeled.jsonl").stat().st_mtime_ns)
        label(rms["rm9"], out, *COMMON, "keep_human_labels=true", "overwrite=true")
        return {"out": out, "before": before, "refused": refused, "after_refusal": after_refusal}

    def untrained():
        # input: the reference output (9 attributes on every scored turn); its sibling schema matches the RM's
        label(rms["rm9_on_hs2"], base / "untrained", f"input=[{{format: canonical, path: '{reference / 'labeled.jsonl'}'}}]",
              f"chunk_size={CHUNK}", f"max_length={MAX_LENGTH}")
        return base / "untrained"

    def two_ranks():
        label(rms["rm9"], base / "two", *COMMON, torchrun=2)
        return base / "two"

    return parallel({"two_ranks": two_ranks, "untrained": untrained, "overwrite": overwrite})


# ===== 1. sharding ===============================================================================
def test_two_ranks_write_the_bytes_of_one(dependent_runs, reference, inputs):
    out = dependent_runs["two_ranks"]
    one, two = (reference / "labeled.jsonl").read_bytes(), (out / "labeled.jsonl").read_bytes()
    assert one == two
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["chunks"] == s2["chunks"] == 31  # 15 and 16 chunks per rank
    for k in ("rows", "turns_scored", "skipped", "tokens"):
        assert s1[k] == s2[k], k
    assert [r["id"] for r in read_jsonl(out / "labeled.jsonl")] == [c["id"] for c in inputs]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(two).hexdigest() and manifest["rows"] == len(inputs)
    assert not (out / "parts").exists()


# ===== 2. kill -9 and resume =====================================================================
def test_kill_9_then_rerun_gives_the_uninterrupted_bytes(rms, reference, inputs, tmp_path):
    out = tmp_path / "killed"
    cmd = [PY, str(REPO / "recipes" / "label.py"), f"rm={rms['rm9']}", f"output_dir={out}", *COMMON]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "parts").glob("chunk_*.done"))) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the labeling run finished before it could be killed"
    assert not (out / "labeled.jsonl").exists() and not (out / "manifest.json").exists()
    done = sorted((out / "parts").glob("chunk_*.done"))
    assert 3 <= len(done) < 31
    # tear one committed chunk: its checksum no longer matches, so it must be scored again
    torn = out / "parts" / "chunk_000000.jsonl"
    torn.write_bytes(torn.read_bytes()[:100])

    again = label(rms["rm9"], out, *COMMON)
    assert f"{len(done) - 1} of this rank's 31 already committed" in again.stdout
    assert (out / "labeled.jsonl").read_bytes() == (reference / "labeled.jsonl").read_bytes()
    ids = [r["id"] for r in read_jsonl(out / "labeled.jsonl")]
    assert len(ids) == len(set(ids)) and ids == [c["id"] for c in inputs]  # no duplicates, nothing lost
    s_ref, s = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    for k in ("rows", "turns_scored", "skipped", "truncated_left", "tokens"):  # counts cover the whole output
        assert s[k] == s_ref[k], k
    assert s["turns_scored_by_this_run"] < s["turns_scored"]
    assert not (out / "parts").exists()


# ===== 3. over-length policies ===================================================================
def test_over_length_error_names_the_conversation_and_max_length(rms, independent_runs, inputs):
    proc, out = independent_runs["error"]["proc"], independent_runs["error"]["out"]
    long_turns = over_length_turns(rms["rm9"], inputs, MAX_LENGTH)
    first = next((c["id"], k) for c in inputs for k in range(len(c["turns"])) if (c["id"], k) in long_turns)
    assert_user_error(proc, out, f"steerlm: error: {first[0]} turn {first[1]}: field 'length': ")
    assert f"> max_length {MAX_LENGTH}" in error_line(proc)


def test_over_length_skip_counts_and_marks_exactly_the_long_turns(rms, reference, inputs):
    expected = over_length_turns(rms["rm9"], inputs, MAX_LENGTH)
    assert 0 < len(expected) < 181
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["skipped"]["over_length"] == len(expected)
    assert summary["turns_scored"] == 181 - len(expected) and summary["truncated_left"] == 0
    rows = read_jsonl(reference / "labeled.jsonl")
    skipped = {(r["id"], k) for r, k, t in assistant_turns(rows) if t.get("label_status") == "skipped_over_length"}
    assert skipped == expected
    for r, k, t in assistant_turns(rows):
        if (r["id"], k) in expected:  # left unlabeled: the human OASST labels are not kept (keep_human_labels=false)
            assert t["scores"] is None and t["labels"] is None and t["label"] is None
        else:
            assert set(t["scores"]) == set(STEERLM9_ATTRIBUTES) and "label_status" not in t


def test_over_length_truncate_left_scores_every_turn(rms, independent_runs, reference, inputs):
    import numpy as np

    from steerlm.scoring import RewardScorer

    out = independent_runs["truncate"]["out"]
    expected = over_length_turns(rms["rm9"], inputs, MAX_LENGTH)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truncated_left"] == len(expected) and summary["skipped"]["over_length"] == 0
    assert summary["turns_scored"] == 181
    rows = read_jsonl(out / "labeled.jsonl")
    ref = {(r["id"], k): t for r, k, t in assistant_turns(read_jsonl(reference / "labeled.jsonl"))}
    scorer = RewardScorer(str(rms["rm9"]), device="cpu", max_length=MAX_LENGTH, over_length="truncate_left")
    checked = 0
    for r, k, t in assistant_turns(rows):
        assert set(t["scores"]) == set(STEERLM9_ATTRIBUTES) and "label_status" not in t
        if (r["id"], k) not in expected:  # fits: same scores as under skip (other batch neighbours: fp32 noise)
            for a, v in t["scores"].items():
                assert abs(v - ref[(r["id"], k)]["scores"][a]) < FP32_BATCH_NOISE
        elif checked < 3:  # the scores are those of the last max_length tokens of the full input
            from steerlm.templates import tokenize_rm_input
            full = tokenize_rm_input("nemo", scorer.tokenizer, r["system"], r["turns"][:k + 1])
            assert len(full) > MAX_LENGTH
            pred = scorer.score_ids([full[-MAX_LENGTH:]])[0]
            got = np.array([t["scores"][a] for a in STEERLM9_ATTRIBUTES])
            np.testing.assert_allclose(got, pred, atol=1e-4)
            checked += 1
    assert checked > 0


def test_reward_scorer_tokenize_policies(rms):
    from steerlm.errors import DataError
    from steerlm.scoring import RewardScorer, ScoreStats
    from steerlm.templates import tokenize_rm_input

    turns = [{"role": "user", "content": "Tell me about the history of the bicycle in Europe, please."},
             {"role": "assistant", "content": "The first bicycles appeared in Germany around 1817, the draisine. " * 4}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    scorer = RewardScorer(str(rms["rm9"]), device="cpu", max_length=64, over_length="truncate_left")
    full = tokenize_rm_input("nemo", scorer.tokenizer, None, turns)
    assert len(full) > 64
    stats = ScoreStats()
    ids = scorer.tokenize(None, turns, "conv/1 turn 1", stats)
    assert ids == full[-64:] and ids[-1] == scorer.tokenizer.convert_tokens_to_ids("<extra_id_2>")
    assert stats.truncated_left == 1
    short_full = tokenize_rm_input("nemo", scorer.tokenizer, None, short)
    if len(short_full) <= 64:
        assert scorer.tokenize(None, short, "conv/2 turn 1", stats) == short_full and stats.truncated_left == 1
    scorer.over_length = "skip"
    assert scorer.tokenize(None, turns, "conv/1 turn 1", stats) is None and stats.skipped_over_length == 1
    scorer.over_length = "error"
    with pytest.raises(DataError, match=r"conv/1 turn 1: field 'length': \d+ tokens > max_length 64"):
        scorer.tokenize(None, turns, "conv/1 turn 1", stats)


# ===== 4. schema checks ==========================================================================
def test_input_schema_differs_from_the_rm_schema(independent_runs):
    run = independent_runs["mismatch"]
    assert_user_error(run["proc"], run["out"], f"steerlm: error: attribute schema mismatch: input {run['input']} has 'oasst'")
    assert "'steerlm9'" in error_line(run["proc"])


def test_data_label_for_an_attribute_the_rm_lacks(independent_runs):
    run = independent_runs["unknown_attribute"]  # RM schema helpsteer2; the row labels quality
    assert_user_error(run["proc"], run["out"],
                      f"steerlm: error: {run['input']}:2: field 'conversations[1].label': unknown attribute 'quality'")


# ===== 5. untrained heads ========================================================================
def test_untrained_heads_are_never_written(rms, dependent_runs):
    card = json.loads((rms["rm9_on_hs2"] / "steerlm_reward.json").read_text())
    assert card["trained_attributes"] == list(HELPSTEER2_ATTRIBUTES)
    assert json.loads((rms["rm9_on_hs2"] / "attribute_schema.json").read_text())["name"] == "steerlm9"
    out = dependent_runs["untrained"]  # input: the reference output, 9 RM labels on every scored turn
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_attributes"] == list(HELPSTEER2_ATTRIBUTES) and summary["turns_scored"] > 100
    hs2 = set(HELPSTEER2_ATTRIBUTES)
    scored = 0
    for _, _, t in assistant_turns(read_jsonl(out / "labeled.jsonl")):
        if t["scores"] is None:
            assert t["labels"] is None and t["label"] is None
            continue
        scored += 1
        assert set(t["labels"]) == set(t["scores"]) == hs2
        assert {part.split(":")[0] for part in t["label"].split(",")} == hs2
        assert not any(a in t["label"] for a in OASST_ATTRIBUTES)
    assert scored == summary["turns_scored"]


# ===== 6 + 8. overwrite and human labels =========================================================
@pytest.fixture(scope="module")
def overwrite_runs(dependent_runs):
    return dependent_runs["overwrite"]


def test_complete_output_is_not_overwritten_without_overwrite_true(overwrite_runs):
    r = overwrite_runs
    out = r["out"]
    assert r["refused"].returncode == 2 and "Traceback" not in r["refused"].stderr
    assert error_line(r["refused"]) == (f"steerlm: error: {out / 'labeled.jsonl'} is complete; "
                                        "pass overwrite=true to label again")
    assert r["after_refusal"] == r["before"]  # bytes and mtime untouched
    # overwrite=true relabeled (with keep_human_labels=true the bytes differ) and left a consistent record
    new = (out / "labeled.jsonl").read_bytes()
    assert new != r["before"][0]
    assert json.loads((out / "manifest.json").read_text())["sha256"] == hashlib.sha256(new).hexdigest()
    assert json.loads((out / "summary.json").read_text())["turns_scored_by_this_run"] > 0
    assert not (out / "parts").exists()


def test_keep_human_labels_keeps_human_values_and_fills_only_missing(overwrite_runs, reference, inputs):
    rows = read_jsonl(overwrite_runs["out"] / "labeled.jsonl")
    ref = {(r["id"], k): t for r, k, t in assistant_turns(read_jsonl(reference / "labeled.jsonl"))}
    human = {(c["id"], k): t["labels"] for c in inputs for k, t in enumerate(c["turns"]) if t["role"] == "assistant"}
    assert sum(1 for h in human.values() if h) > 50
    disagreements = 0
    for r, k, t in assistant_turns(rows):
        h = human[(r["id"], k)] or {}
        if t["scores"] is None:  # skipped: the human labels are kept as they were
            assert t["labels"] == (h or None)
            continue
        assert t["scores"] == ref[(r["id"], k)]["scores"]  # the same RM scores as without keep_human_labels
        assert set(t["labels"]) == set(STEERLM9_ATTRIBUTES) | set(h)
        for a, v in t["labels"].items():
            assert v == (h[a] if a in h else clip_round(t["scores"][a])), (r["id"], k, a)
            disagreements += a in h and h[a] != clip_round(t["scores"][a])
        assert t["label"] == STEERLM9.format_label(t["labels"])
    assert disagreements > 0  # the human value really won somewhere


# ===== 7. malformed input ========================================================================
def test_malformed_input_line_is_reported_with_file_and_line(independent_runs):
    run = independent_runs["malformed"]
    assert_user_error(run["proc"], run["out"], f"steerlm: error: {run['input']}:3: malformed JSON")


# ===== 9. Python API =============================================================================
def test_python_api_matches_the_cli(rms, reference, inputs):
    import torch
    from omegaconf import OmegaConf

    from steerlm.scoring import RewardScorer
    from steerlm.stages.label import label_conversations

    cfg = OmegaConf.load(REPO / "conf" / "label.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs (OMP_NUM_THREADS=1)
    try:
        scorer = RewardScorer(str(rms["rm9"]), device="cpu", batch_tokens=cfg.batch_tokens, max_length=MAX_LENGTH,
                              over_length="skip")
        # the CLI labels chunk by chunk: chunk by chunk, the API writes the very same bytes
        per_chunk = [row for i in range(0, len(inputs), CHUNK)
                     for row in label_conversations(inputs[i:i + CHUNK], scorer)]
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_chunk).encode()
        assert blob == (reference / "labeled.jsonl").read_bytes()
        # all at once (other batches): the same labels, scores equal up to fp32 batching noise
        at_once = label_conversations(inputs, scorer)
    finally:
        torch.set_num_threads(threads)
    assert [r["id"] for r in at_once] == [c["id"] for c in inputs]
    assert inputs[0]["turns"][1].get("scores") is None  # the input conversations are not modified
    ref = {(r["id"], k): t for r, k, t in assistant_turns(read_jsonl(reference / "labeled.jsonl"))}
    n = 0
    for r, k, t in assistant_turns(at_once):
        want = ref[(r["id"], k)]
        assert t.get("label_status") == want.get("label_status")
        if t["scores"] is None:
            continue
        n += 1
        for a, v in t["scores"].items():
            assert abs(v - want["scores"][a]) < FP32_BATCH_NOISE
            if abs(v - math.floor(v) - 0.5) > 1e-3:  # not on a rounding edge
                assert t["labels"][a] == want["labels"][a]
            assert t["labels"][a] == clip_round(v)  # labels are the clipped, rounded scores
        assert t["label"] == STEERLM9.format_label(t["labels"])
    assert n == 181 - len(over_length_turns(rms["rm9"], inputs, MAX_LENGTH))


# ===== 10. parquet output ========================================================================
def test_parquet_output_reads_back_with_the_same_labels(independent_runs, reference):
    out = independent_runs["parquet"]["out"]
    assert (out / "labeled.parquet").exists() and not (out / "labeled.jsonl").exists()
    assert json.loads((out / "attribute_schema.json").read_text())["attributes"] == list(STEERLM9_ATTRIBUTES)
    got, _ = load_conversations({"format": "canonical", "path": str(out / "labeled.parquet")}, STEERLM9)
    want, _ = load_conversations({"format": "canonical", "path": str(reference / "labeled.jsonl")}, STEERLM9)
    assert [c["id"] for c in got] == [c["id"] for c in want] and len(got) == 123
    assert [[t["labels"] for t in c["turns"]] for c in got] == [[t["labels"] for t in c["turns"]] for c in want]
    assert sum(1 for c in got for t in c["turns"] if t["labels"]) > 100
