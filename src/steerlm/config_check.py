"""Config values checked at load time, before any model loads or any file is touched.

One table, key -> rule (type, range, choices), shared by every recipe: the same key means the same
thing in every stage (`optim.lr`, `engine.precision`, `train.max_steps`, ...). Pipeline configs nest
each stage's config under its name (`label.chunk_size`), so a key is also looked up without that
prefix. Keys not in the table are left to the stage (most of them are paths or free text).

A bad value is a ConfigError naming the key, ``chunk_size=0: expected an integer >= 1``; values that
are legal but do nothing (``optim.lr=0``) get a one-line warning.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError

# the top-level keys of conf/pipeline.yaml that hold a whole stage config
STAGE_SECTIONS = ("reward", "label", "sft", "evaluate", "steerlm2", "ppo")


@dataclass(frozen=True)
class Rule:
    kind: str  # int | num | bool | choice | pattern | betas
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo itself is not allowed
    choices: tuple = ()
    null: bool = False  # null (None) is allowed
    not_values: tuple = ()  # values in range that still make no sense (max_steps=0)

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with `value` ("expected ..."), or None."""
        if value is None:
            return None if self.null else f"must be set: expected {self.describe()}"
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "betas":  # Adam's (β1, β2)
            ok = isinstance(value, list) and len(value) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
        elif self.kind in ("choice", "pattern"):
            ok = value in self.choices if self.kind == "choice" else \
                isinstance(value, str) and any(re.fullmatch(p, value) for p in self.choices)
        else:
            ok = self._number_ok(value)
        return None if ok else f"expected {self.describe()}"

    def _number_ok(self, value: Any) -> bool:
        number = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number) or \
                (isinstance(value, float) and not math.isfinite(value)):
            return False
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        return not (too_low or (self.hi is not None and value > self.hi) or value in self.not_values)

    def describe(self) -> str:
        if self.kind in ("choice", "pattern"):
            text = "one of " + " | ".join(str(c).replace("(:\\d+)?", "[:N]") for c in self.choices)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "betas":
            text = "two numbers in [0, 1), e.g. [0.9, 0.98]"
        else:
            what = "an integer" if self.kind == "int" else "a number"
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
            if self.hi is not None:
                bounds.append(f"<= {self.hi:g}")
            text = f"{what} {' and '.join(bounds)}".strip()
            if self.not_values:
                text += f", not {', '.join(str(v) for v in self.not_values)}"
        return text + (" or null" if self.null else "")


def Int(lo=None, hi=None, **kw) -> Rule:
    return Rule("int", lo, hi, **kw)


def Num(lo=None, hi=None, **kw) -> Rule:
    return Rule("num", lo, hi, **kw)


def Choice(*choices, null=False) -> Rule:
    return Rule("choice", choices=choices, null=null)


BOOL = Rule("bool")
PRECISION = Choice("auto", "bf16", "fp32")
DEVICE = Rule("pattern", choices=("auto", "cpu", r"cuda(:\d+)?"))
OVER_LENGTH = Choice("error", "skip", "truncate_left")
STEPS = Int(-1, not_values=(0,))  # -1: no limit; 0 would train nothing
POSITIVE = Int(1)
POSITIVE_OR_NULL = Int(1, null=True)
FRACTION = Num(0, 1)
LR = Num(0)  # 0 is legal but learns nothing: a warning (check_config)

RULES: dict[str, Rule] = {
    # engine
    "engine.precision": PRECISION, "precision": PRECISION,
    "engine.strategy": Choice("auto", "single", "ddp", "fsdp2", "megatron"),
    "engine.device": DEVICE, "device": DEVICE,
    "engine.tensor_parallel": POSITIVE, "engine.pipeline_parallel": POSITIVE,
    # data, labeling
    "output_format": Choice("jsonl", "parquet"),
    "over_length": OVER_LENGTH, "rm_over_length": OVER_LENGTH, "eval.rm_over_length": OVER_LENGTH,
    "overwrite": BOOL, "keep_human_labels": BOOL, "packing": BOOL, "string_only": BOOL, "level_steering": BOOL,
    "chunk_size": POSITIVE, "max_length": POSITIVE_OR_NULL, "pack_length": POSITIVE_OR_NULL,
    "batch_tokens": POSITIVE_OR_NULL, "rm_batch_tokens": POSITIVE_OR_NULL, "eval.rm_batch_tokens": POSITIVE_OR_NULL,
    "logprob_batch_tokens": POSITIVE,
    "calibration.method": Choice("none", "quantile"),
    "template": Choice("nemo", "hf"),
    "loss.type": Choice("mse", "bt", "margin_bt", "scaled_bt"),
    "attribute_dropout": FRACTION, "end_of_turn_weight": Num(0), "contrast.weight": Num(0),
    "contrast.other": Choice("random", "far"),
    "length_cuts.copies": POSITIVE,
    "level_steering.gain": Num(0, lo_open=True), "level_steering.positions": Choice("all", "prompt", "generated"),
    "level_steering.max_per_side": POSITIVE,
    "level_steering.train": BOOL, "level_steering.init": Choice("mean_difference", "zeros"),
    "level_steering.lr": Num(0, lo_open=True), "level_steering.inference_gain": Num(0, lo_open=True, null=True),
    "level_steering.center": Choice("midpoint", "train_mean"),
    "loss.length_order.ratio": Num(1, lo_open=True), "loss.length_order.margin": Num(0, lo_open=True),
    "loss.length_order.weight": Num(0), "loss.length_order.pairs_per_step": POSITIVE,
    # model
    "model.freeze_backbone": BOOL, "model.gradient_checkpointing": BOOL,
    "model.lora.enabled": BOOL, "model.lora.r": POSITIVE, "model.lora.alpha": Num(0, lo_open=True),
    "model.lora.dropout": Num(0, 1), "model.lora.save_merged": BOOL,
    "lora.r": POSITIVE, "lora.alpha": Num(0, lo_open=True), "lora.dropout": Num(0, 1),
    # optimisation and the training loop
    "optim.lr": LR, "optim.actor_lr": LR, "optim.critic_lr": LR,
    "optim.betas": Rule("betas"), "optim.weight_decay": Num(0), "optim.schedule": Choice("constant", "cosine"),
    "optim.warmup_steps": Int(0), "optim.min_lr_ratio": FRACTION, "optim.max_grad_norm": Num(0, null=True),
    "train.epochs": POSITIVE, "train.max_steps": STEPS,
    "train.global_batch_size": POSITIVE, "train.micro_batch_size": POSITIVE, "train.groups_per_step": POSITIVE,
    "train.log_every": POSITIVE, "train.eval_every": Int(0), "train.save_every": Int(0),
    "train.keep_checkpoints": Int(1),
    "eval.val_fraction": Num(0, 1, not_values=(1,)), "eval.batch_size": POSITIVE,
    "seed": Int(), "save_every": Int(0), "keep_checkpoints": Int(1),
    # generation and evaluation
    "generation.max_new_tokens": POSITIVE, "generation.temperature": Num(0), "generation.do_sample": BOOL,
    "generation.top_p": Num(0, 1, lo_open=True), "generation.top_k": Int(0), "generation.batch_size": POSITIVE,
    "generation.seed": Int(),
    "n_prompts": POSITIVE, "n_samples": POSITIVE, "n_boot": POSITIVE, "iterations": POSITIVE,
    "eval.n_prompts": POSITIVE, "eval.n_samples": POSITIVE, "eval.n_boot": POSITIVE,
    "conditioning.n": Int(0), "eval.conditioning.n": Int(0),  # 0 turns the probe off
    # ppo
    "steps": POSITIVE, "rollout_batch": POSITIVE, "mini_batch": POSITIVE, "ppo_epochs": POSITIVE,
    "n_eval_prompts": Int(0), "max_prompt_tokens": POSITIVE, "kl_coef": Num(0), "gamma": FRACTION, "lam": FRACTION,
    "clip_eps": Num(0, lo_open=True), "value_clip": Num(0, lo_open=True), "entropy_coef": Num(0),
    "critic_warmup_steps": Int(0), "reward.std": Num(0, lo_open=True),
    # serving
    "port": Int(0, 65535), "max_rows": POSITIVE, "max_tokens": POSITIVE, "temperature": Num(0),
    "limits.max_tokens": POSITIVE, "limits.prompt_tokens": POSITIVE, "limits.n": POSITIVE,
    "limits.concurrent": POSITIVE, "limits.body_bytes": POSITIVE,
}


def flat_items(cfg, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, resolved value) of every leaf; lists are leaves."""
    for key in cfg:
        if key == "hydra":  # Hydra's own settings (a stage config nested in the pipeline's keeps its copy)
            continue
        value = cfg[key]  # resolves interpolations; a broken one raises a one-line OmegaConf error
        if isinstance(value, DictConfig):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value


def rule_for(key: str) -> Optional[Rule]:
    if key in RULES:
        return RULES[key]
    section, _, rest = key.partition(".")
    return RULES.get(rest) if section in STAGE_SECTIONS else None


def check_config(cfg: DictConfig, warn=None) -> None:
    """Raise ConfigError for the first value that breaks its rule; warn (stderr) about ones that do nothing."""
    warn = warn or (lambda text: print(f"steerlm: warning: {text}", file=sys.stderr, flush=True))
    for key, value in flat_items(cfg):
        if isinstance(value, list):
            check_data_specs(key, value)
        rule = rule_for(key)
        if rule is None:
            continue
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key}={value!r}: {problem}" if value is not None else f"{key}: {problem}")
        if rule is LR and value == 0:
            warn(f"{key}=0: the weights will not change (training runs but learns nothing)")


def check_data_specs(key: str, items: list) -> None:
    """A list of data-source specs ({format, path, ...}: `input`, `data.train`, ...) is checked spec by spec."""
    from .data.sources import FORMATS, PAIR_FORMATS, check_spec

    for i, spec in enumerate(items):
        if isinstance(spec, dict) and "format" in spec:
            check_spec(spec, tuple(dict.fromkeys(FORMATS + PAIR_FORMATS)), where=f"{key}[{i}]")
