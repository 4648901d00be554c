"""The policy (a causal LM): loading, LoRA, HF-native export, and the steerable-model card.

A stage-3 output directory is loadable by transformers without steerlm:

- full fine-tune: `model/` is a plain `save_pretrained` model (safetensors);
- LoRA: `model/` is a peft adapter (`adapter_config.json` + `adapter_model.safetensors`, which
  `AutoModelForCausalLM.from_pretrained` loads onto its base when peft is installed) and, with
  `save_merged`, `merged/` is the base with the adapter merged in.

Both carry the tokenizer, `attribute_schema.json` and `steerlm_sft.json` (the card): the template,
stop strings, steerable attributes in order and their recommended defaults, so generation needs
no flags to steer the model the way it was trained.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..attributes import AttributeSchema
from ..checkpoint import atomic_directory, save_hf_model, _unshare
from ..errors import ConfigError
from .embedded import resolve_model_path

SFT_CARD = "steerlm_sft.json"


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None):
    from transformers import AutoModelForCausalLM

    if Path(path, "steerlm_reward.json").exists():  # a sequence classifier: its LM head would be random weights
        raise ConfigError(f"{path}: a steerlm reward model, not a causal LM; point model.path at a base or SFT model")
    kwargs = dict(dtype=dtype, trust_remote_code=False)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path), **kwargs)


def load_trainable_policy(path: str, dtype: torch.dtype):
    """The SFT output as a trainable model: base + adapter (only the adapter trains) or the full model."""
    adapter_cfg = Path(path) / "adapter_config.json"
    if not adapter_cfg.exists():
        return load_causal_lm(path, dtype=dtype), False
    from peft import PeftModel

    base = load_causal_lm(json.loads(adapter_cfg.read_text())["base_model_name_or_path"], dtype=dtype)
    with quiet_peft():
        return PeftModel.from_pretrained(base, path, is_trainable=True), True


def apply_lora(model, lora_cfg: Mapping):
    """Wrap with a peft LoRA adapter (only the adapter trains)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.get("target_modules", "all-linear")
    top = lora_cfg.get("top_layers")
    layers = None
    if top is not None:  # adapters on the last k decoder layers only: backward stops below them (cheaper steps)
        n = model.config.num_hidden_layers
        if not 0 < int(top) <= n:
            raise ConfigError(f"model.lora.top_layers={top}: the model has {n} decoder layers")
        layers = list(range(n - int(top), n))
        if targets == "all-linear":  # peft takes layers_to_transform only with explicit module names
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and ".layers." in name})
    config = LoraConfig(r=int(lora_cfg["r"]), lora_alpha=float(lora_cfg["alpha"]),
                        lora_dropout=float(lora_cfg.get("dropout", 0.0)),
                        target_modules=list(targets) if not isinstance(targets, str) else targets,
                        layers_to_transform=layers, task_type="CAUSAL_LM")
    with quiet_peft():
        return get_peft_model(model, config)


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`: a warning per load that users cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def make_card(*, fmt: dict, schema: AttributeSchema, steerable: Sequence[str], defaults: Mapping[str, float],
              base_model: str, max_length: int, lora: bool, extra: Optional[dict] = None) -> dict:
    """The steerable-model card. Defaults cover every steerable attribute (missing ones: scale midpoint)."""
    mid = round((schema.scale_min + schema.scale_max) / 2)
    full_defaults = {a: float(defaults.get(a, mid)) for a in steerable}
    for a, v in full_defaults.items():
        schema.check_value(a, v)
    return {"format": fmt, "steerable_attributes": list(steerable), "default_attributes": full_defaults,
            "base_model": base_model, "max_length": max_length, "lora": lora, **(extra or {})}


def save_policy(run_model_dir: Path, *, hf_model, state: dict[str, torch.Tensor], tokenizer, schema: AttributeSchema,
                card: dict, lora: bool, base_path: str, save_merged: bool, dtype: torch.dtype) -> list[Path]:
    """Write `model/` (full model or adapter) and optionally `merged/`, atomically. Returns the dirs written."""
    written = []
    if not lora:
        save_hf_model(hf_model, state, run_model_dir, tokenizer=tokenizer, schema=schema, extra_json={SFT_CARD: card})
        return [run_model_dir]
    with atomic_directory(run_model_dir) as tmp:
        adapter = {k: v for k, v in state.items() if "lora_" in k}
        hf_model.save_pretrained(tmp, state_dict=_unshare(adapter), safe_serialization=True)
        _fix_adapter_base(tmp, base_path)
        tokenizer.save_pretrained(tmp)
        schema.save(tmp)
        (tmp / SFT_CARD).write_text(json.dumps(card, indent=2) + "\n")
    written.append(run_model_dir)
    if save_merged:
        written.append(save_merged_policy(run_model_dir, tokenizer=tokenizer, schema=schema, card=card, dtype=dtype))
    return written


def save_merged_policy(adapter_dir: Path, *, tokenizer, schema: AttributeSchema, card: dict, dtype: torch.dtype) -> Path:
    """`<adapter_dir>/../merged`: the base with the adapter merged in, a plain HF model (atomically)."""
    merged_dir = adapter_dir.parent / "merged"
    merged = load_for_generation(str(adapter_dir), dtype=dtype)
    with atomic_directory(merged_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        schema.save(tmp)
        (tmp / SFT_CARD).write_text(json.dumps({**card, "lora": False, "merged_from": str(adapter_dir)}, indent=2) + "\n")
    return merged_dir


def _fix_adapter_base(adapter_dir: Path, base_path: str) -> None:
    """Point the adapter at the resolved base (an embedded model's converted directory)."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = resolve_model_path(base_path)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def read_card(path: str) -> dict:
    p = Path(path) / SFT_CARD
    if not p.exists():
        raise FileNotFoundError(f"{path}: not a steerlm SFT model (no {SFT_CARD}); train one with recipes/train_sft.py")
    return json.loads(p.read_text())


def load_for_generation(path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None):
    """A full model, or an adapter loaded on its base and merged (one matmul per layer, not two)."""
    adapter_cfg = Path(path) / "adapter_config.json"
    if not adapter_cfg.exists():
        return load_causal_lm(path, dtype=dtype, attn_implementation=attn_implementation)
    from peft import PeftModel

    base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
    if not Path(base_path).exists() and "/" not in base_path:
        raise ConfigError(f"{path}: adapter base {base_path!r} not found")
    base = load_causal_lm(base_path, dtype=dtype, attn_implementation=attn_implementation)
    with quiet_peft():
        return PeftModel.from_pretrained(base, path).merge_and_unload()
