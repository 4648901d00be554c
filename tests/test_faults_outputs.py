"""Corpus, part 3: nothing finished is lost (issue 21).

On a tiny RM and a complete label output: `overwrite=true` runs that fail (bad RM path, bad input, an
unsupported format) and a run killed with -9 leave the earlier output byte for byte; a full disk or an
unwritable directory ends in one line naming the path, leaves no `.tmp` behind, and the rerun finishes with the
bytes of an uninterrupted run; a pipeline stage that fails puts its earlier output back.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PY, REPO, assert_one_error, run_recipe, snapshot, tiny_reward_overrides
from steerlm.errors import OutputError
from steerlm.locks import LOCK

OASST = "data/oasst1/oasst1_validation_en.messages.jsonl.gz"
INPUT = f"input=[{{format: oasst, path: {OASST}, max_rows: 60}}]"
COMMON = [INPUT, "chunk_size=4", "max_length=512", "engine.precision=fp32"]


def finished(directory: Path) -> dict[str, bytes]:
    """The finished output: every file but label's uncommitted parts and a killed run's lock (both left by design:
    the rerun resumes from the parts and takes the stale lock over)."""
    return {k: v for k, v in snapshot(directory).items() if not k.startswith("parts/") and k != LOCK}


@pytest.fixture(scope="module")
def rm(tiny_model_dir, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("rm")
    run_recipe("train_reward", *tiny_reward_overrides(tiny_model_dir, base))
    return base / "model"


@pytest.fixture(scope="module")
def complete(rm, tmp_path_factory) -> Path:
    """A complete label output: labeled.jsonl, manifest.json, summary.json, attribute_schema.json."""
    out = tmp_path_factory.mktemp("complete") / "label"
    run_recipe("label", f"rm={rm}", f"output_dir={out}", *COMMON)
    assert {"labeled.jsonl", "manifest.json", "summary.json"} <= set(finished(out))
    return out


def copy_of(complete: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "label"
    shutil.copytree(complete, out)
    return out, finished(out)


def bad_files(tmp_path: Path) -> dict[str, Path]:
    user = {"role": "user", "content": "hi", "labels": None}
    bot = {"role": "assistant", "content": "hello", "labels": None}
    rows = [{"id": f"c/{i}", "group": f"g/{i}", "system": None, "source": "t", "turns": t}
            for i, t in enumerate([[user, bot], [bot, user, bot]])]
    (tmp_path / "assistant_first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "malformed.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"id": \n')
    return {"assistant_first": tmp_path / "assistant_first.jsonl", "malformed": tmp_path / "malformed.jsonl"}


# (overrides given the rm and the bad files, fragments of the one error line)
OVERWRITE_FAILURES = {
    "mistyped_rm": (lambda rm, f: ["rm=/nonexistent/reward/model", *COMMON],
                    ["/nonexistent/reward/model: not a steerlm reward model"]),
    "assistant_first_input": (lambda rm, f: [f"rm={rm}", f"input=[{{format: canonical, path: '{f['assistant_first']}'}}]"],
                              [":2: field 'turns[0].role'"]),
    "malformed_input": (lambda rm, f: [f"rm={rm}", f"input=[{{format: canonical, path: '{f['malformed']}'}}]"],
                        [":2: malformed JSON"]),
    "csv_output_format": (lambda rm, f: [f"rm={rm}", *COMMON, "output_format=csv"],
                          ["output_format='csv': expected one of jsonl | parquet"]),
    "no_overwrite": (lambda rm, f: [f"rm={rm}", *COMMON], ["labeled.jsonl is complete; pass overwrite=true"]),
}


@pytest.mark.parametrize("case", list(OVERWRITE_FAILURES))
def test_a_failed_run_leaves_the_complete_output_exactly_as_it_was(rm, complete, tmp_path, case):
    out, before = copy_of(complete, tmp_path)
    overrides, fragments = OVERWRITE_FAILURES[case]
    overwrite = [] if case == "no_overwrite" else ["overwrite=true"]
    proc = run_recipe("label", f"output_dir={out}", *overrides(rm, bad_files(tmp_path)), *overwrite, check=False,
                      timeout=300)
    assert_one_error(proc.returncode, proc.stderr, *fragments)
    assert finished(out) == before  # labeled.jsonl, manifest.json and summary.json untouched
    assert not (out / "labeled.csv").exists()


def test_kill_9_during_overwrite_keeps_the_complete_output_then_the_rerun_replaces_it(rm, complete, tmp_path):
    out, before = copy_of(complete, tmp_path)
    cmd = [PY, str(REPO / "recipes" / "label.py"), f"rm={rm}", f"output_dir={out}", *COMMON, "overwrite=true",
           "keep_human_labels=true"]  # other bytes than the complete output's
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "parts" / "chunk_000001.done").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert finished(out) == before
    # the lock of the killed run is stale: the same command takes it over, resumes and replaces the output
    run_recipe("label", *cmd[2:])
    new = (out / "labeled.jsonl").read_bytes()
    assert new != before["labeled.jsonl"]
    assert json.loads((out / "manifest.json").read_text())["sha256"] == hashlib.sha256(new).hexdigest()
    assert not list(out.rglob("*.tmp")) and not (out / "parts").exists()


# ===== disk full, read-only: patched writes (tests may run as root, and mounting a tmpfs needs privileges) =====
def label_in_process(capsys, rm, out, *extra):
    from hydra import compose, initialize_config_dir

    from steerlm import cli
    from steerlm.stages import label

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("label", overrides=[f"rm={rm}", f"output_dir={out}", *COMMON, "engine.device=cpu", *extra])
    with pytest.raises(SystemExit) as e:
        cli.stage_entry(label.run)(cfg)
        sys.exit(0)
    return e.value.code, capsys.readouterr().err


def failing_fsync(monkeypatch, code: int, name: str):
    """os.fsync of a file whose path ends with `name` fails with `code`: what a full disk does to a flushed write."""
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code,name,what", [
    (errno.ENOSPC, "chunk_000001.jsonl.tmp",
     "parts/chunk_000001.jsonl: writing labeled chunk 1 failed: No space left on device"),
    (errno.EROFS, "chunk_000000.jsonl.tmp",
     "parts/chunk_000000.jsonl: writing labeled chunk 0 failed: Read-only file system"),
    (errno.EDQUOT, "labeled.jsonl.tmp", "labeled.jsonl: writing the labeled output failed: Disk quota exceeded"),
], ids=["disk_full_mid_run", "read_only", "quota_at_the_final_write"])
def test_disk_full_is_one_line_without_tmp_files_and_the_rerun_finishes(monkeypatch, capsys, rm, complete, tmp_path,
                                                                        code, name, what):
    out = tmp_path / "label"
    with monkeypatch.context() as m:
        failing_fsync(m, code, name)
        rc, err = label_in_process(capsys, rm, out)
    assert_one_error(rc, err, f"steerlm: error: {out}/{what}", "rerun the same command to continue")
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    rc, err = label_in_process(capsys, rm, out)  # space freed: the same command continues
    assert rc == 0, err
    assert (out / "labeled.jsonl").read_bytes() == (complete / "labeled.jsonl").read_bytes()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories (the patched case covers it)")
def test_read_only_output_directory_is_one_line(rm, tmp_path):
    out = tmp_path / "label"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = run_recipe("label", f"rm={rm}", f"output_dir={out}", *COMMON, check=False, timeout=300)
    finally:
        out.chmod(0o755)
    assert_one_error(proc.returncode, proc.stderr, str(out), "Permission denied")


def test_write_bytes_atomic_keeps_the_old_file_on_a_full_disk(monkeypatch, tmp_path):
    from steerlm.checkpoint import write_text_atomic

    path = tmp_path / "summary.json"
    path.write_text("old")
    failing_fsync(monkeypatch, errno.ENOSPC, "summary.json.tmp")
    with pytest.raises(OutputError, match="summary.json: writing the run summary failed: No space left"):
        write_text_atomic(path, "new", "the run summary")
    assert path.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_directory_on_a_full_disk_leaves_no_tmp_dir(tmp_path):
    from steerlm.checkpoint import atomic_directory

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("old")
    with pytest.raises(OutputError, match="No space left on device"):
        with atomic_directory(tmp_path / "model") as d:
            (d / "w").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (tmp_path / "model" / "w").read_text() == "old" and not (tmp_path / "model.tmp").exists()


# ===== the pipeline's .previous/ move ================================================================
def test_a_failed_pipeline_stage_puts_its_earlier_output_back(rm, tmp_path):
    run_dir = tmp_path / "p"
    base = ["model=tiny_llama", f"run_dir={run_dir}", "stages=[label]", f"label.rm={rm}",
            "label.engine.precision=fp32", "label.reuse_features=null", "label.chunk_size=8"]
    run_recipe("pipeline", *base, f"label.input=[{{format: oasst, path: {OASST}, max_rows: 30}}]")
    before, previous = finished(run_dir / "label"), snapshot(run_dir / ".previous") if (run_dir / ".previous").exists() else {}
    bad = bad_files(tmp_path)["assistant_first"]
    proc = run_recipe("pipeline", *base, f"label.input=[{{format: canonical, path: '{bad}'}}]", check=False, timeout=300)
    assert_one_error(proc.returncode, proc.stderr, f"{bad}:2: field 'turns[0].role'")
    assert finished(run_dir / "label") == before  # moved to .previous/ for the run, and back after it failed
    after_previous = snapshot(run_dir / ".previous") if (run_dir / ".previous").exists() else {}
    assert after_previous == previous
