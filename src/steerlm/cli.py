"""The `steerlm` command, and the error boundary every stage shares.

    steerlm --help                                   # the commands
    steerlm pipeline model=tiny_llama run_dir=runs/p # any Hydra override, as `python recipes/pipeline.py ...`
    steerlm train-sft --help                         # Hydra's help: the stage's config and its groups
    torchrun --nproc_per_node 2 -m steerlm train-sft engine.strategy=fsdp2

Each command is one Hydra app over the configs shipped inside the package (`steerlm/conf`);
`recipes/<name>.py` are thin aliases kept for checkouts and sbatch templates.

`stage_entry` checks every config value against `config_check.RULES` and takes the output
directory's lock before the stage starts; `main` turns Hydra's own errors (an unknown key, a bad
override, a missing config file) into the same one line, ``steerlm: error: config: ...``, exit 2.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig

from .config_check import check_config
from .errors import end_run, user_errors
from .locks import output_lock
from .resources import CONF_DIR

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


# ===== the commands ==============================================================================


@dataclass(frozen=True)
class Command:
    config: str        # conf/<config>.yaml
    module: str        # the module whose run(cfg) the command calls
    job: str           # Hydra's job name (log file, sweep dirs): the recipe's name, as before the CLI
    summary: str


COMMANDS = {
    "pipeline": Command("pipeline", "steerlm.pipeline", "pipeline",
                        "reward -> label -> sft -> evaluate (+ steerlm2, ppo) in one run dir, then a report"),
    "train-reward": Command("reward", "steerlm.stages.reward", "train_reward",
                            "stage 1: the multi-attribute reward model"),
    "label": Command("label", "steerlm.stages.label", "label", "stage 2: label chat data with the reward model"),
    "train-sft": Command("sft", "steerlm.stages.sft", "train_sft", "stage 3: attribute-conditioned SFT"),
    "evaluate": Command("evaluate", "steerlm.stages.evaluate", "evaluate",
                        "steerability: conditioning strength, generation sweep, side effects, baselines"),
    "generate": Command("generate", "steerlm.stages.generate", "generate",
                        "steered generation with per-request attribute values"),
    "serve": Command("serve", "steerlm.stages.serve", "serve",
                     "OpenAI-compatible server with per-request attributes and steering"),
    "train-steerlm2": Command("steerlm2", "steerlm.stages.steerlm2", "train_steerlm2", "SteerLM 2.0 iterations"),
    "train-ppo": Command("ppo", "steerlm.stages.ppo", "train_ppo", "PPO rewarded by the attribute reward model"),
    "build-steering-vectors": Command("steering_vectors", "steerlm.stages.steering_vectors",
                                      "build_steering_vectors", "attribute vectors for activation steering"),
    "compare-steering": Command("compare_steering", "steerlm.stages.steer_compare", "compare_steering",
                                "AC-SFT vs activation steering on the same prompts"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: steerlm <command> [key=value ...] [--help]", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "Overrides are Hydra's: steerlm train-sft model=tiny_llama train.max_steps=5",
              f"Configs: {CONF_DIR}"]
    return "\n".join(lines)


def run_command(name: str, overrides: Sequence[str]) -> None:
    """Run one command as a Hydra app on `overrides` (what follows the command on the command line)."""
    import hydra  # the --help path above stays fast

    command = COMMANDS[name]

    def task(cfg: DictConfig) -> None:
        importlib.import_module(command.module).run(cfg)

    # Hydra names the job (its log file, sweep dirs) after the task's module's last part: the recipe's name, as
    # before the CLI. No such module exists, so submitit's cloudpickle ships the task by value, as any closure.
    task.__module__ = f"{__name__}.{command.job}"
    app = hydra.main(config_path=str(CONF_DIR), config_name=command.config, version_base="1.3")(stage_entry(task))
    sys.argv = [f"steerlm {name}", *overrides]  # Hydra reads its overrides from sys.argv
    main(app)


def console_main(argv: Optional[Sequence[str]] = None) -> None:
    """`steerlm <command> ...`: the console script and `python -m steerlm`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"steerlm: error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    run_command(argv[0], argv[1:])
