"""Metrics go to stdout, a JSONL file in the run dir, and wandb when enabled (rank 0 only).

`MetricLogger` is a no-op on other ranks, so training code calls `logger.log(...)` everywhere
without `if rank == 0` guards.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional


def print0(*args, rank: Optional[int] = None, **kwargs) -> None:
    if (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0:
        print(*args, **kwargs, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class MetricLogger:
    """Append-only metrics log.

    Args:
        run_dir: where `metrics.jsonl` lives (appended, so a resumed run continues the file).
        is_main: only rank 0 writes.
        wandb_cfg: mapping with `enabled`, `project`, `name`, `mode` ("online" / "offline" /
            "disabled"); None or enabled=false means no wandb.
        config: the resolved run config, sent to wandb.
    """

    def __init__(self, run_dir: str | os.PathLike, *, is_main: bool = True,
                 wandb_cfg: Optional[Mapping] = None, config: Optional[dict] = None,
                 filename: str = "metrics.jsonl"):
        self.is_main = is_main
        self.path = Path(run_dir) / filename
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg and wandb_cfg.get("enabled"):
            import wandb

            self._wandb = wandb.init(project=wandb_cfg.get("project", "steerlm"), name=wandb_cfg.get("name"),
                                     mode=wandb_cfg.get("mode", "online"), dir=str(run_dir), config=config,
                                     resume="allow")

    def log(self, metrics: Mapping[str, Any], step: int, *, echo: bool = True) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            print(f"step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()), flush=True)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL (tests and reports read runs back with this)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
