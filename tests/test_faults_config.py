"""Corpus, part 1: config mistakes, Hydra problems, locks, ports and bugs at the error boundary (issue 21).

Config values are checked by `cli.stage_entry` before the stage function runs: each case composes the real
recipe config with one bad override and asserts exit code 2, exactly one `steerlm: error:` line naming the
key, and that the stage was never called (so no model loaded and no file was touched). Hydra's own errors and
a port in use go through the real recipes as subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import PY, REPO, assert_one_error, run_recipe
from steerlm import cli
from steerlm.locks import LOCK, DirectoryInUse, output_lock

# (config, override, fragments of the one error line)
BAD_VALUES = [
    ("label", "chunk_size=0", "chunk_size=0: expected an integer >= 1"),
    ("label", "chunk_size=-3", "chunk_size=-3"),
    ("label", "chunk_size=abc", "chunk_size='abc': expected an integer"),
    ("label", "output_format=csv", "output_format='csv': expected one of jsonl | parquet"),
    ("label", "over_length=cut", "over_length='cut'"),
    ("label", "overwrite=yes", "overwrite='yes': expected true or false"),
    ("label", "batch_tokens=0", "batch_tokens=0"),
    ("label", "engine.precision=fp16", "engine.precision='fp16': expected one of auto | bf16 | fp32"),
    ("label", "engine.device=gpu", "engine.device='gpu'"),
    ("label", "calibration.method=isotonic", "calibration.method='isotonic'"),
    ("label", "max_length=0", "max_length=0"),
    ("label", "'input=[{format: oasst, path: x.jsonl, bogus: 1}]'", "input[0] has unknown keys ['bogus']"),
    ("label", "'input=[{format: csv, path: x.csv}]'", "input[0] format 'csv' is not one of"),
    ("label", "'input=[{format: oasst, path: x.jsonl, max_rows: 0}]'", "input[0] max_rows must be a positive integer"),
    ("reward", "optim.lr=-1", "optim.lr=-1: expected a number >= 0"),
    ("reward", "train.max_steps=0", "train.max_steps=0"),
    ("reward", "train.global_batch_size=0", "train.global_batch_size=0"),
    ("reward", "train.micro_batch_size=2.5", "train.micro_batch_size=2.5: expected an integer"),
    ("reward", "eval.val_fraction=1.5", "eval.val_fraction=1.5"),
    ("reward", "eval.val_fraction=1", "eval.val_fraction=1"),
    ("reward", "loss.type=hinge", "loss.type='hinge'"),
    ("reward", "optim.schedule=linear", "optim.schedule='linear'"),
    ("reward", "optim.lr=nan", "optim.lr=nan"),
    ("reward", "'optim.betas=[0.9]'", "optim.betas=[0.9]: expected two numbers in [0, 1)"),
    ("reward", "loss.length_order.ratio=0.5", "loss.length_order.ratio=0.5: expected a number > 1"),
    ("reward", "'data.train=[{format: helpsteer2, path: x.jsonl, lang: en}]'", "data.train[0] key 'lang' applies only"),
    ("sft", "attribute_dropout=1.5", "attribute_dropout=1.5"),
    ("sft", "packing=maybe", "packing='maybe'"),
    ("sft", "model.lora.r=0", "model.lora.r=0"),
    ("sft", "template=chatml", "template='chatml'"),
    ("sft", "engine.strategy=zero3", "engine.strategy='zero3'"),
    ("generate", "generation.top_p=0", "generation.top_p=0"),
    ("generate", "generation.temperature=-0.5", "generation.temperature=-0.5"),
    ("generate", "generation.max_new_tokens=0", "generation.max_new_tokens=0"),
    ("evaluate", "n_prompts=0", "n_prompts=0"),
    ("serve", "port=70000", "port=70000: expected an integer >= 0 and <= 65535"),
    ("serve", "limits.max_tokens=0", "limits.max_tokens=0"),
    ("ppo", "gamma=2", "gamma=2"),
    ("pipeline", "label.chunk_size=0", "label.chunk_size=0"),
    ("pipeline", "sft.optim.lr=-1e-4", "sft.optim.lr=-0.0001"),
]


def compose_cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=[o.strip("'") for o in overrides])


def through_boundary(capsys, cfg, stage=None) -> tuple[int, str, list]:
    """Call the recipe boundary in-process: -> (exit code, stderr, the configs the stage was called with)."""
    called = []
    entry = cli.stage_entry(stage or called.append)
    with pytest.raises(SystemExit) as e:
        entry(cfg)
        sys.exit(0)
    return e.value.code, capsys.readouterr().err, called


@pytest.mark.parametrize("name,override,fragment", BAD_VALUES, ids=[f"{n}:{o}" for n, o, _ in BAD_VALUES])
def test_bad_config_value_is_one_line_before_the_stage_starts(capsys, tmp_path, name, override, fragment):
    cfg = compose_cfg(name, override)
    code, err, called = through_boundary(capsys, cfg)
    assert_one_error(code, err, fragment)
    assert called == []  # refused at load time: no model loaded, nothing written


def test_lr_zero_warns_and_runs(capsys, tmp_path):
    cfg = compose_cfg("sft", "optim.lr=0", f"run_dir={tmp_path / 'sft'}")
    code, err, called = through_boundary(capsys, cfg)
    assert code == 0 and len(called) == 1
    assert "steerlm: warning: optim.lr=0: the weights will not change" in err


def test_a_bug_keeps_its_traceback_and_says_so(capsys, tmp_path):
    def buggy(cfg):
        return {}["missing"]

    code, err, _ = through_boundary(capsys, compose_cfg("label", f"output_dir={tmp_path}"), stage=buggy)
    assert code == 1 and "Traceback" in err and "KeyError" in err
    assert "steerlm: internal error: KeyError: this is a bug in steerlm" in err.strip().splitlines()[-1]


def test_every_default_config_passes_the_checks():
    from steerlm.config_check import check_config

    for name in ("reward", "reward_full", "label", "sft", "evaluate", "generate", "serve", "ppo", "steerlm2",
                 "steering_vectors", "compare_steering", "pipeline", "pipeline/steerable"):
        check_config(compose_cfg(name))


# ===== Hydra's own errors, through the real recipe =====================================================
HYDRA_CASES = [
    (["nosuchkey=1"], "config: Could not override 'nosuchkey'"),
    (["chunk_size=[1"], "config: no viable alternative at input '[1'"),
    (["engine=nope"], "config: In 'label': Could not find 'engine/nope'"),
    (["--config-name", "nope"], "config: Cannot find primary config 'nope'"),
]


@pytest.mark.parametrize("overrides,fragment", HYDRA_CASES, ids=[c[1][8:30] for c in HYDRA_CASES])
def test_hydra_config_problem_is_one_line(tmp_path, overrides, fragment):
    proc = run_recipe("label", f"output_dir={tmp_path / 'out'}", *overrides, check=False, timeout=120)
    line = assert_one_error(proc.returncode, proc.stderr, fragment)
    assert "Config search path" not in line and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not (tmp_path / "out" / "labeled.jsonl").exists()


# ===== locks: one run per output directory ============================================================
HOLDER = "import sys, time; from steerlm.locks import output_lock\nwith output_lock(sys.argv[1]):\n" \
         "    print('locked', flush=True); time.sleep(120)\n"


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/out (a first run, still going)."""
    proc = subprocess.Popen([PY, "-c", HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_on_a_locked_directory_names_the_first_ones_pid(holder, tmp_path):
    proc = run_recipe("label", f"output_dir={tmp_path / 'out'}", "rm=/nonexistent/rm", check=False, timeout=120)
    assert_one_error(proc.returncode, proc.stderr, f"{tmp_path / 'out'}: in use by another run (pid {holder.pid}")


def test_a_lock_above_covers_the_directories_below(holder, tmp_path):
    with pytest.raises(DirectoryInUse, match=f"pid {holder.pid}"):
        with output_lock(tmp_path / "out" / "label"):
            pass


def test_a_stale_lock_of_a_killed_run_is_taken_over(holder, tmp_path):
    holder.kill()
    holder.wait()
    lock = tmp_path / "out" / LOCK
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind by kill -9
    with output_lock(tmp_path / "out"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released at the end


def test_a_lock_is_released_after_a_failed_run(capsys, tmp_path):
    def fails(cfg):
        raise FileNotFoundError("x.jsonl: no such file")

    code, err, _ = through_boundary(capsys, compose_cfg("label", f"output_dir={tmp_path / 'out'}"), stage=fails)
    assert_one_error(code, err, "x.jsonl: no such file")
    assert not (tmp_path / "out" / LOCK).exists()


# ===== the server's port ===============================================================================
def test_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:  # the policy does not exist: the port is checked first, so its error is the one shown
        proc = run_recipe("serve", f"port={port}", f"policy={tmp_path / 'nope'}", check=False, timeout=120)
    finally:
        busy.close()
    assert_one_error(proc.returncode, proc.stderr, f"port={port}: cannot listen on 127.0.0.1:{port}",
                     "Address already in use")


def test_server_corpus_is_covered_by_test_serve():
    """Bad requests get their own 400 while good ones are answered, max_tokens is capped, streaming works:
    tests/test_serve.py proves each on the live server; this keeps those tests from disappearing silently."""
    text = (Path(__file__).parent / "test_serve.py").read_text()
    for name in ("test_bad_requests_get_their_own_4xx_while_good_ones_are_answered",
                 "test_disconnect_cancels_generation_and_long_requests_do_not_block_short_ones",
                 "test_openai_client_plain_streaming_n_and_stop"):
        assert f"def {name}(" in text
    assert '(chat("Hi", max_tokens=100000), 400, "max_tokens")' in text


def test_a_reward_model_given_as_the_policy_is_one_line(tmp_path, capsys):
    # a steerlm RM directory loads as a causal LM with a random LM head; it must be refused instead
    from steerlm.errors import ConfigError
    from steerlm.models.policy import load_causal_lm

    (tmp_path / "steerlm_reward.json").write_text("{}")
    with pytest.raises(ConfigError, match="a steerlm reward model, not a causal LM"):
        load_causal_lm(str(tmp_path))


@pytest.mark.parametrize("name,override", [("sft", "eval.conditioning.n=0"), ("reward", "optim.max_grad_norm=0"),
                                           ("evaluate", "conditioning.n=0"), ("sft", "train.eval_every=0")])
def test_values_the_configs_document_as_off_pass_the_checks(name, override):
    # conf/*.yaml say "0 turns it off" / "0 disables clipping": the load-time table must accept them
    from steerlm.config_check import check_config

    check_config(compose_cfg(name, override))
