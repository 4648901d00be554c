"""Benchmark the SFT and reward stages on engine=megatron vs engine=torch (FSDP2 / DDP / single), side by side.

    # on a GPU node (the measurement issue 6 asks for: a 0.5-1B model, tokens/s/GPU and MFU)
    python scripts/bench_megatron.py --model Qwen/Qwen2.5-0.5B-Instruct --gpus 8 --tp 2 --peak-tflops 989
    # on a CPU, a smoke run of the script itself (the numbers say nothing about GPUs)
    python scripts/bench_megatron.py --model tiny --gpus 2 --tp 2 --steps 4

Each side runs the real stage CLI under torchrun in its own process group, on the same data, steps and global
batch, computing in the weights' dtype (--dtype; Megatron's layers have no autocast, so neither side uses it);
the loss curves are printed next to each other (they agree to ~1e-6 in fp32, tests/test_megatron_stages.py).
tokens/s is the stage's own non-pad count (summary.json), per GPU = / world size. MFU = 6 · N · tokens/s /
(world · peak FLOP/s), N = the model's parameters (the attention term is left out). On CPU, megatron-core runs
through the test-only CPU redirect (tests/megatron_recipe.py). Last line:
`RESULT megatron_vs_torch=<megatron tokens/s / torch tokens/s> target=1.0` (SFT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HS2 = "data/helpsteer2/helpsteer2_train_first100.jsonl"


def run_stage(recipe: str, overrides: list[str], procs: int, megatron: bool, cpu: bool) -> float:
    script = REPO / ("tests/megatron_recipe.py" if megatron and cpu else f"recipes/{recipe}.py")
    args = [recipe] if megatron and cpu else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), str(script),
           *args, *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        sys.exit(f"{recipe} ({'megatron' if megatron else 'torch'}) failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def read(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(x)["train/loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in json.loads(x)]
    return {"tok_s": summary.get("tokens_per_s") or summary.get("train_tokens_per_s"), "losses": losses,
            "peak_mb": summary["peak_mem_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="an HF model path/id, or 'tiny' (a random tiny Llama, CPU smoke)")
    ap.add_argument("--gpus", type=int, default=2, help="processes (GPUs) per run")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--torch-strategy", default="fsdp2", choices=["fsdp2", "ddp"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--dtype", default=None, help="model.dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-GPU dense bf16 peak (H100 SXM: 989)")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig

    cpu = not torch.cuda.is_available()
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    tmp = Path(tempfile.mkdtemp(prefix="bench_megatron_"))
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(REPO / "scripts"))
        from make_tiny_model import make_tiny_model

        model = str(tmp / "tiny")
        make_tiny_model(model)
    n_params = _count_params(AutoConfig.from_pretrained(model))
    # both engines compute in the weights' dtype (Megatron has no autocast), so neither side autocasts
    common_sft = [f"model.path={model}", f"model.dtype={dtype}", "engine.precision=fp32", f"data.train=[{{format: helpsteer2, path: {HS2}}}]",
                  f"max_length={args.max_length}", "pack_length=null", "packing=false", "model.lora.enabled=false",
                  f"train.max_steps={args.steps}", f"train.global_batch_size={args.global_batch}", "train.save_every=0",
                  "optim.lr=1e-5", "eval.val_fraction=0.05"]
    common_rm = [f"model.path={model}", f"model.dtype={dtype}", "engine.precision=fp32", "model.freeze_backbone=false",
                 f"data.train=[{{format: helpsteer2, path: {HS2}}}]", f"max_length={args.max_length}",
                 f"train.max_steps={args.steps}", f"train.global_batch_size={args.global_batch}",
                 "train.micro_batch_size=2", "train.save_every=0", "eval.val_fraction=0.05"]
    megatron = ["engine=megatron", f"engine.tensor_parallel={args.tp}", f"engine.pipeline_parallel={args.pp}"]
    torch_engine = [f"engine.strategy={args.torch_strategy}"]
    rows = []
    for recipe, common in (("train_sft", common_sft), ("train_reward", common_rm)):
        for name, extra in (("torch " + args.torch_strategy, torch_engine), (f"megatron TP{args.tp} PP{args.pp}", megatron)):
            run_dir = tmp / f"{recipe}_{name.split()[0]}"
            wall = run_stage(recipe, [*common, *extra, f"run_dir={run_dir}"], args.gpus, name.startswith("megatron"), cpu)
            r = read(run_dir)
            per_gpu = r["tok_s"] / args.gpus
            mfu = 6 * n_params * per_gpu / (args.peak_tflops * 1e12) if args.peak_tflops else None
            rows.append({"stage": recipe, "engine": name, **r, "per_gpu": per_gpu, "mfu": mfu, "wall": wall})
    print(f"\nmodel {args.model} ({n_params / 1e6:.1f} M params), {args.gpus} {'CPU processes' if cpu else 'GPUs'}, "
          f"{args.steps} steps x {args.global_batch}, dtype {dtype}")
    print(f"{'stage':<13} {'engine':<22} {'tok/s':>10} {'tok/s/GPU':>10} {'MFU':>7} {'peak MB':>9} {'wall s':>7}  losses")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:4])
        print(f"{r['stage']:<13} {r['engine']:<22} {r['tok_s']:>10.1f} {r['per_gpu']:>10.1f} {mfu:>7} "
              f"{r['peak_mb']:>9.0f} {r['wall']:>7.1f}  {losses}")
    sft = [r for r in rows if r["stage"] == "train_sft"]
    print(f"RESULT megatron_vs_torch={sft[1]['tok_s'] / sft[0]['tok_s']:.2f} target=1.0")


def _count_params(config) -> int:
    """Parameters of a Llama-family decoder from its config (embeddings counted once when tied)."""
    h, L, V, f = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    attn = h * d * heads * 2 + h * d * kv * 2
    per_layer = attn + 3 * h * f + 2 * h
    tied = getattr(config, "tie_word_embeddings", False)
    return L * per_layer + V * h * (1 if tied else 2) + h


if __name__ == "__main__":
    main()
