"""The SteerLM pipeline: reward -> label -> sft -> evaluate (-> steerlm2, ppo) through one run directory.

Every stage keeps a record next to its outputs, `<stage dir>/steerlm_stage.json`::

    {stage, status: running | complete, config: <the resolved stage config>, config_sha256,
     inputs: {path: digest}, outputs: {relpath: {bytes, sha256}}, started_at, wall_time_s, resumed}

Before anything runs, each selected stage gets one action:

- `skip`:   a complete record, the same config and input digests, and every output file unchanged
            (size and sha256 re-checked).
- `resume`: a `running` record with the same config and inputs, i.e. a run that was cut off. The
            stage continues from its own checkpoints (reward, sft: `resume=auto`), its committed chunks
            (label), or starts again (evaluate: nothing to keep).
- `run`:    no record, or the config / inputs / outputs changed, or a stage it reads from runs in this
            invocation. An existing stage dir is moved to `<run_dir>/.previous/<stage>` first (one
            previous copy is kept; nothing is deleted in place).

A stage input that another stage of this run dir wrote is digested from that stage's record (the
sha256s of its files under that path), so a downstream check costs no extra hashing; other local
inputs are hashed directly; hub ids and `embedded:` names are taken as they are.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import write_text_atomic
from .engines import torch_engine as te
from .errors import ConfigError
from .locks import LOCK
from .logging import print0
from .stage_table import ORDER, RECORD, STAGES, read_record

# Produced by a stage but not its result: training state, label's uncommitted parts, reward's feature cache.
NOT_OUTPUTS = {"checkpoints", "parts", "cache", ".hydra", "wandb", RECORD, LOCK}
# Keys that change how a stage runs, never what it writes: a change does not re-run the stage.
VOLATILE = ("resume", "overwrite", "logging", "train.log_every", "train.save_every", "train.keep_checkpoints",
            "save_every", "keep_checkpoints",
            "batch_tokens", "chunk_size", "rm_batch_tokens", "eval.batch_size", "engine.device", "device")




@dataclass
class Step:
    stage: str
    action: str                      # skip | resume | run | record (finished, but the record was not written)
    reason: str
    config: dict
    dir: Path
    upstream: list[str] = field(default_factory=list)
    record: Optional[dict] = None                      # the record found when planning
    record_inputs: dict = field(default_factory=dict)  # input digests when the stage starts


# ===== digests ===================================================================================
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_files(stage_dir: Path) -> dict[str, dict]:
    """{relpath: {bytes, sha256}} of a stage's results (everything but NOT_OUTPUTS and logs)."""
    files = {}
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir)
        if p.is_file() and rel.parts[0] not in NOT_OUTPUTS and p.suffix != ".log":
            files[rel.as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def _digest(entries: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps(sorted((k, v["sha256"]) for k, v in entries.items())).encode()).hexdigest()


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        return {k: v for key, val in d.items() for k, v in flatten(val, f"{prefix}{key}.").items()} or {prefix[:-1]: {}}
    if isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        return {k: v for i, val in enumerate(d) for k, v in flatten(val, f"{prefix[:-1]}[{i}].").items()}
    return {prefix[:-1]: d}


def fingerprint_config(config: dict) -> dict:
    """The stage config minus VOLATILE keys (and their subtrees), flattened."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == vol or k.startswith(vol + ".") for vol in VOLATILE)}


# ===== planning ==================================================================================
def stage_configs(cfg: DictConfig) -> dict[str, dict]:
    """Each stage's resolved config (the `hydra` node a nested stage config brings along is dropped)."""
    out = {}
    for name in ORDER:
        with open_dict(cfg):  # its interpolations (e.g. ${output_dir}) would resolve against the pipeline root
            cfg[name].pop("hydra", None)
        out[name] = OmegaConf.to_container(cfg[name], resolve=True)
    return out


def selected_stages(stages) -> list[str]:
    names = [stages] if isinstance(stages, str) else list(stages or [])
    for n in names:
        if n not in STAGES:
            raise ConfigError(f"unknown stage {n!r} in stages; choose from {', '.join(ORDER)}")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"stages must list each stage at most once and at least one, got {names}")
    return [n for n in ORDER if n in names]  # always run in pipeline order


def producer_of(path: str, dirs: dict[str, Path]) -> Optional[str]:
    p = Path(path).resolve()
    for name, d in dirs.items():
        if p == d.resolve() or d.resolve() in p.parents:
            return name
    return None


def input_digest(path: str, producer: Optional[str], dirs: dict[str, Path]) -> str:
    if producer is not None:
        rec = read_record(dirs[producer])
        if rec and rec.get("status") == "complete":
            rel = Path(path).resolve().relative_to(dirs[producer].resolve()).as_posix()
            entries = {k: v for k, v in rec["outputs"].items() if rel == "." or k == rel or k.startswith(rel + "/")}
            return _digest(entries)
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return _digest({r: {"sha256": sha256_file(p / r)} for r in
                        sorted(q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file())})
    return f"name:{path}"  # a hub id or an embedded:<name>: the name is all there is to compare


def describe_change(old: dict, new: dict, limit: int = 4) -> str:
    keys = sorted(set(old) | set(new), key=str)
    changed = [k for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>")]
    parts = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:limit]]
    return ", ".join(parts) + (f" (+{len(changed) - limit} more)" if len(changed) > limit else "")


def plan(cfg: DictConfig) -> list[Step]:
    configs = stage_configs(cfg)
    dirs = {n: Path(configs[n][STAGES[n].dir_key]) for n in ORDER}
    selected = selected_stages(cfg.stages)
    steps, running = [], set()
    for name in selected:
        spec, config, stage_dir = STAGES[name], configs[name], dirs[name]
        inputs = [(key, path, producer_of(str(path), {n: d for n, d in dirs.items() if n != name}))
                  for key, path in spec.inputs(config)]
        for key, path, producer in inputs:
            if producer is not None and producer not in selected and not Path(path).exists():
                raise ConfigError(
                    f"stage {name!r} needs {path} ({name}.{key}), the output of stage {producer!r}, which has not run "
                    f"in {cfg.run_dir}; add it to stages (stages=[{','.join(sorted({producer, *selected}, key=ORDER.index))}]) "
                    f"or point {name}.{key} at an existing one")
        upstream = sorted({p for _, _, p in inputs if p is not None}, key=ORDER.index)
        record = read_record(stage_dir)
        step = Step(name, "run", "", config, stage_dir, upstream, record)
        rerunning = [p for p in upstream if p in running]
        if rerunning:
            step.reason = f"upstream {', '.join(rerunning)} runs in this invocation"
        elif record is None:
            step.reason = "not run yet" if not _nonempty(stage_dir) else \
                "outputs without a pipeline record (moved to .previous/)"
        else:
            fp = fingerprint_config(config)
            digests = {str(path): input_digest(str(path), producer, dirs) for _, path, producer in inputs}
            if record.get("config_sha256") != config_sha256(fp):
                step.reason = f"config changed: {describe_change(record.get('config', {}), fp)}"
            elif record.get("inputs") != digests:
                changed = [p for p in digests if record.get("inputs", {}).get(p) != digests[p]]
                step.reason = f"inputs changed: {', '.join(changed)}"
            elif record.get("status") != "complete":
                finished = all((stage_dir / f).exists() for f in spec.finished)
                step.action, step.reason = ("record", "finished; its record was cut off") if finished else \
                    ("resume", "cut off earlier, same config and inputs")
            else:
                bad = _changed_outputs(stage_dir, record["outputs"])
                if bad:
                    step.reason = f"outputs changed since it completed: {', '.join(bad[:3])}"
                else:
                    step.action = "skip"
                    step.reason = f"complete, same config and inputs ({record.get('wall_time_s', '?')} s)"
        if step.action != "skip":
            running.add(name)
        steps.append(step)
    return steps


def _nonempty(d: Path) -> bool:
    return d.is_dir() and any(d.iterdir())


def _changed_outputs(stage_dir: Path, recorded: dict[str, dict]) -> list[str]:
    bad = []
    for rel, meta in recorded.items():
        p = stage_dir / rel
        if not p.is_file():
            bad.append(f"{rel} missing")
        elif p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            bad.append(f"{rel} checksum differs")
    return bad


# ===== running ===================================================================================
def format_plan(steps: list[Step]) -> str:
    return "\n".join(f"  {s.stage:<9} {s.action:<7} {s.reason}" for s in steps)


def _write_record(step: Step, status: str, *, wall: Optional[float] = None, outputs=None, resumed=False) -> None:
    fp = fingerprint_config(step.config)
    record = {"stage": step.stage, "status": status, "config": fp, "config_sha256": config_sha256(fp),
              "inputs": step.record_inputs, "resolved_config": step.config,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": resumed}
    if status == "complete":
        record.update(wall_time_s=round(wall, 1), outputs=outputs)
    step.dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(step.dir / RECORD, json.dumps(record, indent=2, default=str) + "\n")


def set_aside(stage_dir: Path, run_dir: Path, stage: str) -> tuple[Path, Path]:
    """Move `stage_dir` to `.previous/<stage>`; the copy already there waits in `.previous/.<stage>.older` until the
    new run succeeds. -> (previous, older)."""
    previous, older = run_dir / ".previous" / stage, run_dir / ".previous" / f".{stage}.older"
    shutil.rmtree(older, ignore_errors=True)
    previous.parent.mkdir(parents=True, exist_ok=True)
    if previous.exists():
        os.replace(previous, older)
    shutil.move(str(stage_dir), str(previous))
    print0(f"{stage}: the earlier {stage_dir} moved to {previous}")
    return previous, older


def restore(stage_dir: Path, previous: Path, older: Path) -> None:
    """Undo `set_aside` after a failed run: the new partial output goes, the earlier one comes back."""
    shutil.rmtree(stage_dir, ignore_errors=True)
    shutil.move(str(previous), str(stage_dir))
    if older.exists():
        os.replace(older, previous)
    print0(f"the earlier {stage_dir} is back in place (this run failed)")


def _run_step(step: Step, info, configs_dirs: dict[str, Path]) -> dict:
    """Run one stage that is not up to date and write its record. -> its result row."""
    import importlib

    # inputs are digested now: upstream stages of this invocation have just finished
    step.record_inputs = {str(path): input_digest(str(path), producer_of(str(path), {
        n: d for n, d in configs_dirs.items() if n != step.stage}), configs_dirs)
        for _, path in STAGES[step.stage].inputs(step.config)}
    if info.is_main and step.action != "record":
        _write_record(step, "running", resumed=step.action == "resume")
    te.barrier()
    t0 = time.time()
    if step.action != "record" and (STAGES[step.stage].every_rank or info.is_main):
        te.reset_peak_memory(info.device)
        stage_module = importlib.import_module(STAGES[step.stage].entry)
        stage_module.run(OmegaConf.create(step.config))
        gc.collect()
    te.barrier()
    wall = time.time() - t0
    missing = [f for f in STAGES[step.stage].finished if not (step.dir / f).exists()]
    if missing:
        raise RuntimeError(f"stage {step.stage} returned without writing {missing} in {step.dir}")
    if info.is_main:
        _write_record(step, "complete", wall=wall, outputs=output_files(step.dir), resumed=step.action != "run")
    te.barrier()
    print0(f"{step.stage}: done in {wall:.1f} s")
    return {"stage": step.stage, "action": step.action, "wall_time_s": round(wall, 1)}


def run(cfg: DictConfig) -> list[dict]:
    """Plan, run each selected stage that is not up to date, write report.md/.html. -> per-stage results."""
    with te.distributed(cfg.get("device", "auto")) as info:
        steps = plan(cfg)
        print0(f"pipeline {cfg.run_dir}: {len(steps)} stage(s)\n{format_plan(steps)}")
        configs_dirs = {n: Path(c[STAGES[n].dir_key]) for n, c in stage_configs(cfg).items()}
        results = []
        for i, step in enumerate(steps, 1):
            if step.action == "skip":
                results.append({"stage": step.stage, "action": "skip", "wall_time_s": step.record.get("wall_time_s")})
                continue
            print0(f"\n===== [{i}/{len(steps)}] {step.stage}: {step.action} ({step.reason}) =====")
            aside = None
            if info.is_main and step.action == "run" and _nonempty(step.dir):
                aside = set_aside(step.dir, Path(cfg.run_dir), step.stage)
            te.barrier()
            try:
                results.append(_run_step(step, info, configs_dirs))
            except Exception:  # a failed stage leaves its earlier output exactly as it was (kill/Ctrl-C: resumable)
                if aside is not None:
                    restore(step.dir, *aside)
                raise
            if aside is not None:
                shutil.rmtree(aside[1], ignore_errors=True)
        if info.is_main:
            from .report import write_report  # lazy: the report pulls in matplotlib

            report = write_report(cfg.run_dir, configs_dirs, results, examples=cfg.report.examples,
                                  max_chars=cfg.report.max_chars)
            print0(f"\nreport: {report} (+ report.html)\n" + "\n".join(
                f"  {r['stage']:<9} {r['action']:<7} {r['wall_time_s']} s" for r in results))
        return results
