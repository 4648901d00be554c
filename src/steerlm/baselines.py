"""The honest baselines for AC-SFT: the base instruct model *asked* for a level in words, and the base model
*steered* through its activations. A user deciding whether SteerLM is worth training needs these beside it.

- `prompting`: the policy's base model (no fine-tuning, no attribute string) with a system instruction per
  requested level, e.g. verbosity 0 "Answer in one short sentence." ... 4 "Answer in great detail.". Level
  instructions are config (`baselines.prompting.instructions`); an empty string means no instruction.
- `activation`: the same base model, h ← h + c_l · v_a at one decoder layer for requested level l, with
  v_a = mean response activation of the highest-rated labeled turns minus that of the lowest-rated
  (`steering.vectors`), c_l from `baselines.activation.coefficients` (one per level; 0 at the middle level).

Both answer the same prompts as the AC-SFT sweep and are rated by the same RM and text measures.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .attributes import AttributeSchema
from .errors import ConfigError
from .models.policy import load_causal_lm

PLAIN_CARD = {"format": {"template": "hf", "stop_strings": []}, "steerable_attributes": [], "default_attributes": {}}


def base_model(policy, path: str):
    """A SteerableModel of the policy's base: the plain chat template, no attribute segment."""
    from .steerable import SteerableModel

    model = load_causal_lm(path, dtype=next(policy.model.parameters()).dtype).to(policy.device).eval()
    return SteerableModel(model, policy.tokenizer, policy.schema, dict(PLAIN_CARD), policy.device)


def instructed(prompt: Mapping, instruction: str) -> dict:
    """The prompt with `instruction` as (the start of) its system prompt; "" leaves it unchanged."""
    if not instruction:
        return dict(prompt)
    system = prompt.get("system")
    return {**prompt, "system": instruction if not system else f"{instruction}\n\n{system}"}


def check_instructions(instructions: Mapping[str, Sequence[str]], attributes: Sequence[str],
                       levels: Sequence[int]) -> dict[str, list[str]]:
    """One instruction per level (0..max level indexed) for every swept attribute, else a one-line error."""
    out = {}
    for a in attributes:
        texts = instructions.get(a)
        if texts is None:
            raise ConfigError(f"baselines.prompting.instructions has no entry for {a!r}; give one string per level "
                              f"(levels {list(levels)}) or drop prompting from baselines.methods")
        if len(texts) <= max(levels):
            raise ConfigError(f"baselines.prompting.instructions.{a}: {len(texts)} strings, need one per level up to "
                              f"{max(levels)}")
        out[a] = [str(t) for t in texts]
    return out


def check_coefficients(coefficients: Sequence[float], levels: Sequence[int]) -> list[float]:
    if len(coefficients) <= max(levels):
        raise ConfigError(f"baselines.activation.coefficients: {len(coefficients)} values, need one per level up to "
                          f"{max(levels)}")
    c = [float(v) for v in coefficients]
    if any(b < a for a, b in zip(c, c[1:])):
        raise ConfigError(f"baselines.activation.coefficients must not decrease with the level, got {c}")
    return c


def attribute_vectors(base, labeled: str, attributes: Sequence[str], layer: int, *, max_per_side: int,
                      max_length: int):
    """v_a at `layer` for each attribute, from the base model's activations on `labeled` (steering.vectors)."""
    from .steering.vectors import build_attribute_vectors

    return build_attribute_vectors(base.model, base.tokenizer, base.format, base.schema, labeled, attributes, [layer],
                                   max_per_side=max_per_side, max_length=max_length, device=base.device)


def middle_layer(model: torch.nn.Module) -> int:
    from .engines.torch_engine import decoder_layers

    return len(decoder_layers(model)) // 2


def schema_levels(schema: AttributeSchema) -> list[int]:
    return [int(v) for v in schema.levels()]
