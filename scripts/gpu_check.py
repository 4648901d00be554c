"""The GPU check: SFT (packed; LoRA and full; torch and Megatron engines), the RM training step and generation on
random-init Llama models of ~0.5B and ~1.5B parameters, in bf16, with tokens/s/GPU, MFU and peak memory.

    bash scripts/gpu_check.sh                  # one H100/H200, no network, < 8 min (wheels: scripts/fetch_gpu_wheels.sh)
    bash scripts/gpu_check.sh --smoke          # CPU, a tiny model, fp32, seconds: the same code path (CI runs it)
    python scripts/gpu_check.py --sizes 0.5b --steps 6 --out runs/gpu_check

Every number comes from a real stage run (`python -m steerlm <command>`, its summary.json or its printed
tokens/s), one process per run, on the bundled HelpSteer2 rows. No download: the models are built from a config
with a byte-level BPE tokenizer trained on the bundled data (scripts/make_tiny_model.py).

MFU = F · N · tokens/s / peak bf16 FLOP/s, N = the model's parameters (embeddings included, attention scores left
out), F = 6 for a full fine-tune and the RM step (forward 2N, backward 4N), 4 for LoRA (the frozen weights get no
weight gradient: forward 2N + the activation gradients 2N). Peak dense bf16: H100/H200 SXM 989 TFLOP/s.
Writes gpu_check.json and gpu_check.md (a table) in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_tiny_model import make_tiny_model  # noqa: E402

HS2 = "${bundled:helpsteer2/helpsteer2_train_first100.jsonl}"
# name: (hidden, layers, heads, kv heads, intermediate); vocab 32,000 (Llama-2's)
SIZES = {"0.5b": (1024, 24, 16, 8, 4096), "1.5b": (2048, 28, 16, 8, 5632), "tiny": (64, 2, 4, 2, 128)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_model(size: str, root: Path) -> tuple[Path, int]:
    hidden, layers, heads, kv, inter = SIZES[size]
    out = root / f"llama_{size}"
    if not (out / "config.json").exists():
        make_tiny_model(out, vocab_size=512 if size == "tiny" else 4096, hidden=hidden, layers=layers, heads=heads,
                        kv_heads=kv, intermediate=inter, pad_vocab_to=None if size == "tiny" else 32000)
    cfg = json.loads((out / "config.json").read_text())
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv_dim = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    n_params = L * (2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h) + 2 * v * h + h
    return out, n_params


def run(command: str, overrides: list[str], gpu: bool, megatron: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    if megatron and not gpu:  # megatron-core on CPU: the tests' gloo redirect (tests/megatron_recipe.py)
        from steerlm.cli import COMMANDS

        recipe = COMMANDS[command].job  # recipes/<job>.py
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(REPO / "tests" / "megatron_recipe.py"), recipe]
    elif megatron:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "steerlm",
               command]
    else:
        cmd = [sys.executable, "-m", "steerlm", command]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd + overrides, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(f"  FAILED ({proc.returncode}): {' '.join(cmd + overrides)}\n{proc.stderr[-2500:]}", flush=True)
    return proc, wall


def check(size: str, model: Path, n_params: int, work: Path, args, gpu: bool) -> list[dict]:
    precision = ["engine.precision=bf16"] if gpu else ["engine.precision=fp32"]
    steps, rows = str(args.steps), []
    sft_common = [f"model.path={model}", f"data.train=[{{format: helpsteer2, path: '{HS2}'}}]", "packing=true",
                  f"pack_length={args.pack_length}", f"max_length={args.pack_length}", f"train.max_steps={steps}",
                  "train.global_batch_size=8", "train.micro_batch_size=1", "train.save_every=0",
                  "train.eval_every=0", "model.lora.save_merged=false", "eval.conditioning.attributes=[]"]
    runs = [("sft", "torch", "lora", "train-sft", sft_common + precision, False),
            ("sft", "torch", "full", "train-sft", sft_common + precision + ["model.lora.enabled=false"], False),
            ("sft", "megatron tp1", "lora", "train-sft",
             sft_common + ["engine=megatron", f"model.dtype={'bfloat16' if gpu else 'float32'}"], True),
            ("sft", "megatron tp1", "full", "train-sft",
             sft_common + ["engine=megatron", f"model.dtype={'bfloat16' if gpu else 'float32'}",
                           "model.lora.enabled=false"], True),
            ("rm step", "torch", "full", "train-reward",
             [f"model.path={model}", "model.freeze_backbone=false", f"train.max_steps={steps}",
              "train.global_batch_size=8", "train.micro_batch_size=4", "train.save_every=0",
              f"data.train=[{{format: helpsteer2, path: '{HS2}'}}]"] + precision, False)]
    peak = peak_tflops()
    for what, engine, mode, command, overrides, megatron in runs:
        run_dir = work / f"{size}_{what.replace(' ', '_')}_{engine.replace(' ', '_')}_{mode}"
        proc, wall = run(command, overrides + [f"run_dir={run_dir}"], gpu, megatron)
        row = {"size": size, "params": n_params, "what": what, "engine": engine, "mode": mode, "ok": proc.returncode == 0,
               "wall_s": round(wall, 1), "mfu": None}
        if row["ok"]:
            s = json.loads((run_dir / "summary.json").read_text())
            tok_s = s.get("tokens_per_s") or s.get("train_tokens_per_s")
            flops_per_token = (4 if mode == "lora" else 6) * n_params
            row.update(tokens_per_s_per_gpu=tok_s, peak_mem_mb=s.get("peak_mem_mb"),
                       mfu=round(flops_per_token * tok_s / (peak * 1e12), 4) if peak and tok_s else None)
        rows.append(row)
        print(f"  {size} {what} {engine} {mode}: {row}", flush=True)
    rows.append(generation(size, n_params, work, gpu))
    return rows


def generation(size: str, n_params: int, work: Path, gpu: bool) -> dict:
    """Generation from the full SFT model above: 16 prompts, greedy, 128 new tokens (8 on CPU), batch 16."""
    model = work / f"{size}_sft_torch_full" / "model"
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"Explain topic number {i} in a few sentences.\n" for i in range(16)))
    proc, wall = run("generate", [f"model.path={model}", f"prompts_file={prompts}", f"output={work / f'{size}_gen.jsonl'}",
                                  f"generation.max_new_tokens={128 if gpu else 8}", "generation.batch_size=16"], gpu)
    row = {"size": size, "params": n_params, "what": "generate", "engine": "steerlm", "mode": "greedy",
           "ok": proc.returncode == 0, "wall_s": round(wall, 1), "mfu": None}  # decoding is bandwidth-bound
    m = re.search(r"\(([\d.]+) tokens/s\)", proc.stderr)
    if row["ok"] and m:
        row["tokens_per_s_per_gpu"] = float(m.group(1))
    print(f"  {size} generate: {row}", flush=True)
    return row


def table(rows: list[dict], device: str) -> str:
    lines = [f"GPU check on {device}, {time.strftime('%Y-%m-%d')}", "",
             "| model | run | engine | mode | tokens/s/GPU | MFU | peak MB | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        tok = r.get("tokens_per_s_per_gpu", "FAILED" if not r["ok"] else "-")
        lines.append(f"| {r['size']} ({r['params'] / 1e6:,.1f}M) | {r['what']} | {r['engine']} | {r['mode']} | {tok} | "
                     f"{mfu} | {r.get('peak_mem_mb', '-')} | {r['wall_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny model, fp32, 2 steps")
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pack-length", type=int, default=2048)
    ap.add_argument("--out", default="runs/gpu_check")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        sys.exit("gpu_check: no CUDA device; run with --smoke for the CPU check of the script itself")
    if args.smoke:
        args.sizes, args.steps, args.pack_length = "tiny", 2, 512
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if gpu else "CPU (smoke)"
    print(f"gpu_check: {device}, sizes {args.sizes}, {args.steps} steps", flush=True)
    rows = []
    for size in args.sizes.split(","):
        model, n_params = build_model(size, out / "models")
        print(f"{size}: {n_params / 1e6:,.1f}M parameters", flush=True)
        rows += check(size, model, n_params, out / "runs", args, gpu)
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                                   indent=2) + "\n")
    text = table(rows, device)
    (out / "gpu_check.md").write_text(text)
    print(text)
    failed = [r for r in rows if not r["ok"]]
    print(f"RESULT gpu_check_runs_ok={len(rows) - len(failed)}/{len(rows)} target={len(rows)}/{len(rows)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
