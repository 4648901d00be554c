"""The pipeline's stage table and the record each stage leaves in its directory.

`steerlm.pipeline` plans and runs from this table; `steerlm.report` reads the records. Both import it,
neither imports the other's module (no import circle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import ConfigError

RECORD = "steerlm_stage.json"


def _sources(key: str, specs) -> list[tuple[str, str]]:
    return [(f"{key}[{i}].path", s["path"]) for i, s in enumerate(specs or [])]


def _activation_labels(c: dict) -> list[tuple[str, str]]:
    """The labeled turns the activation-steering baseline builds its vectors from (when that baseline runs)."""
    b = c.get("baselines") or {}
    return [("baselines.activation.labeled", b["activation"]["labeled"])] if "activation" in (b.get("methods") or []) else []


@dataclass(frozen=True)
class StageSpec:
    name: str
    dir_key: str                                   # the stage config key of its output dir
    inputs: Callable[[dict], list[tuple[str, str]]]  # stage config -> [(config key, path)] it reads
    finished: tuple[str, ...]                      # files the stage writes last: all present = it finished
    every_rank: bool                               # runs on every torchrun rank (else rank 0; the rest wait)
    entry: str                                     # module with run(cfg)


STAGES = {s.name: s for s in (
    StageSpec("reward", "run_dir",
              lambda c: [("model.path", c["model"]["path"])] + _sources("data.train", c["data"]["train"])
              + _sources("data.pairs", c["data"].get("pairs")),
              ("summary.json", "model/config.json"), True, "steerlm.stages.reward"),
    StageSpec("label", "output_dir", lambda c: [("rm", c["rm"])] + _sources("input", c["input"]),
              ("manifest.json",), True, "steerlm.stages.label"),
    StageSpec("sft", "run_dir",
              lambda c: [("model.path", c["model"]["path"])] + _sources("data.train", c["data"]["train"]),
              ("summary.json", "model/steerlm_sft.json"), True, "steerlm.stages.sft"),
    StageSpec("evaluate", "output_dir",
              lambda c: [("model.path", c["model"]["path"]), ("rm", c["rm"])] + _sources("prompts", c["prompts"])
              + _sources("conditioning.data", c["conditioning"]["data"]) + _activation_labels(c),
              ("steerability.json",), False, "steerlm.stages.evaluate"),
    StageSpec("steerlm2", "run_dir",
              lambda c: [("policy", c["policy"]), ("rm", c["rm"])] + _sources("prompts", c["prompts"])
              + [(k, v) for k, v in (("reference", c["reference"]), ("data_file", c["data_file"]),
                                     ("eval.before", c["eval"]["before"])) if v],
              ("summary.json", "model/steerlm_sft.json"), False, "steerlm.stages.steerlm2"),
    StageSpec("ppo", "run_dir",
              lambda c: [("policy", c["policy"]), ("rm", c["rm"])] + _sources("prompts", c["prompts"])
              + ([("reward.standardize_from", c["reward"]["standardize_from"])] if c["reward"]["standardize_from"] else []),
              ("summary.json", "model/steerlm_sft.json"), False, "steerlm.stages.ppo"),
)}
ORDER = tuple(STAGES)


def read_record(stage_dir: Path) -> Optional[dict]:
    path = stage_dir / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: unreadable stage record ({e}); move the file away to re-run the stage") from e
