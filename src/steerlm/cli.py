"""The error boundary every recipe shares: Hydra config problems, bad config values, bad data, faults.

    @hydra.main(config_path="../conf", config_name="label", version_base="1.3")
    @cli.stage_entry
    def main(cfg): label.run(cfg)

    if __name__ == "__main__":
        cli.main(main)

`stage_entry` checks every config value against `config_check.RULES` and takes the output
directory's lock before the stage starts; `main` turns Hydra's own errors (an unknown key, a bad
override, a missing config file) into the same one line, ``steerlm: error: config: ...``, exit 2.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

from omegaconf import DictConfig

from .config_check import check_config
from .errors import end_run, user_errors
from .locks import output_lock

# the key naming a recipe's output directory, in order of preference (generate and serve have none)
OUTPUT_DIR_KEYS = ("run_dir", "output_dir")


def output_dir_of(cfg: DictConfig):
    for key in OUTPUT_DIR_KEYS:
        if cfg.get(key):
            return cfg[key]
    return None


def _lock(cfg: DictConfig):
    directory = output_dir_of(cfg)
    # under torchrun the ranks of one job share the directory: global rank 0 holds the lock for all of them
    if directory is None or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return output_lock(directory)


def stage_entry(fn: Callable[[DictConfig], object]):
    """Validate `cfg`, lock its output directory, run `fn`; errors end as one line (`errors.user_errors`)."""

    @functools.wraps(fn)
    @user_errors
    def wrapper(cfg: DictConfig):
        check_config(cfg)
        with _lock(cfg):
            return fn(cfg)

    return wrapper


def main(hydra_main: Callable[[], object]) -> None:
    """Run a `@hydra.main` function; Hydra's composition errors end as one line and exit 2."""
    # Hydra re-raises instead of printing its own multi-line report; errors from the task itself never get here
    # (stage_entry has already sorted them)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except Exception as e:  # noqa: BLE001 -- the boundary
        end_run(e)
