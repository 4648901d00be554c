"""Make a tiny random Llama with a real byte-level BPE tokenizer, for tests and smoke runs.

    python scripts/make_tiny_model.py runs/tiny_llama

The tokenizer is trained on the bundled data (no hub), knows the NeMo `<extra_id_*>` markers as
single tokens, and carries a ChatML chat template so both prompt templates work. Deterministic:
the same seed gives the same weights.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]


def corpus(limit: int = 3000):
    with open(REPO / "data/helpsteer2/helpsteer2_train_first100.jsonl") as f:
        for line in f:
            r = json.loads(line)
            yield r["prompt"]
            yield r["response"]
    with gzip.open(REPO / "data/oasst1/oasst1_validation_en.messages.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            yield json.loads(line)["text"]


def make_tiny_model(out_dir: str | Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, seed: int = 0, intermediate: int | None = None,
                    pad_vocab_to: int | None = None) -> Path:
    """`intermediate` defaults to 2 x hidden; `pad_vocab_to` sizes the embedding past the tokenizer (rows never
    looked up), so a larger random model (scripts/gpu_check.py) has a realistic embedding and LM head."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                     bos_token="<|endoftext|>", unk_token=None)
    hf_tok.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=max(len(hf_tok), pad_vocab_to or 0), hidden_size=hidden,
                         intermediate_size=intermediate or hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, pad_token_id=hf_tok.pad_token_id,
                         eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.bos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="runs/tiny_llama")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_model(args.out_dir, seed=args.seed))
