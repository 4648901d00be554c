"""Steered generation from the command line: `steerlm generate` (the model: steerlm.steerable.SteerableModel).

    steerlm generate model.path=runs/sft/model prompt='Explain DNS.' attributes.verbosity=0
    steerlm generate model.path=runs/sft/model prompts_file=prompts.jsonl output=runs/gen/out.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..attributes import AttributeSchema
from ..checkpoint import write_text_atomic
from ..errors import ConfigError
from ..models.policy import read_card
from ..steerable import Prompt, SteerableModel, read_prompts_file, resolve_attributes, steering_spec


def run(cfg: DictConfig) -> list[dict]:
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise ConfigError("give exactly one of prompt='...' or prompts_file=<.txt|.jsonl>")
    if cfg.output is not None and not str(cfg.output).endswith(".jsonl"):
        raise ConfigError(f"output {cfg.output}: must be a .jsonl path (or null: stdout)")
    overrides = OmegaConf.to_container(cfg.attributes, resolve=True) or {}
    # a bad attribute fails before the weights load
    attributes = resolve_attributes(read_card(cfg.model.path), AttributeSchema.load(cfg.model.path), overrides)
    model = SteerableModel.load(cfg.model.path, cfg.device, cfg.precision)
    spec = steering_spec(cfg, model)
    if cfg.prompt is not None:
        prompts: list[Prompt] = [{"system": cfg.system, "turns": [{"role": "user", "content": str(cfg.prompt)}]}]
    else:
        prompts = [{"system": cfg.system, "turns": [{"role": "user", "content": p}]} if isinstance(p, str) else p
                   for p in read_prompts_file(cfg.prompts_file, model.schema)]
    options = OmegaConf.to_container(cfg.generation, resolve=True)
    # the explicit overrides, not the resolved ones: level steering moves only what the user asked for
    outputs = model.generate(prompts, overrides or None, steering=spec, level_steering=bool(cfg.get("level_steering", True)),
                             **options)
    assert not outputs or outputs[0]["attributes"] == attributes
    rows = []
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        label = model.schema.format_label(o["attributes"])
        print(f"=== {i + 1}/{len(prompts)} [{label}] ({o['tokens']} tokens{', stopped' if o['stopped'] else ''})")
        print(o["text"], flush=True)
        rows.append({"system": p.get("system"), "turns": p["turns"], "response": o["text"], "tokens": o["tokens"],
                     "stopped": o["stopped"], "attributes": o["attributes"], "label": label})
    if cfg.output is not None:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    s = model.stats.to_dict()
    print(f"generate: {len(rows)} responses, {s['generated_tokens']} tokens in {s['seconds']} s "
          f"({s['tokens_per_s']} tokens/s) on {model.device}" + (f"; written to {cfg.output}" if cfg.output else ""),
          file=sys.stderr, flush=True)
    return rows
