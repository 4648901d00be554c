"""Benchmark stage-1 reward-model TRAINING throughput: steerlm's trainer vs HF `transformers.Trainer`.

    python scripts/bench_reward.py                     # SmolLM2-135M full fine-tune (~7 min on 2 CPU cores)
    python scripts/bench_reward.py --model tiny        # tiny random Llama, a smoke run in seconds
    python scripts/bench_reward.py --steps 8 --batch-size 8 --max-length 384 --out bench.json

What is compared: one full fine-tune (every parameter trains) of the same model, on the same
training samples, for the same number of optimizer steps of the same batch size, in fp32 on CPU
(bf16 autocast on both sides on a GPU), with the same objective and the same optimizer:

- steerlm: the real CLI `recipes/train_reward.py` (model.freeze_backbone=false, micro batch =
  global batch, no accumulation, no checkpoints), with its length-grouped batches.
- hf_trainer: the peer, `Trainer` + `AutoModelForSequenceClassification(num_labels=9,
  problem_type="regression")` with its defaults: `RandomSampler` and `DataCollatorWithPadding`
  (pad to the longest sample of each batch). HF's built-in regression loss is plain MSE over all 9
  outputs, which would train on the -100 "missing" markers, so `compute_loss` is overridden with
  steerlm's `losses.masked_mse` (mean over the batch): the same objective and the same math on both
  sides. The peer's settings a performance-minded user would touch are swept: its sampler (the default
  random one and `train_sampling_strategy="group_by_length"`) x its micro-batch (the batch, and half of it with
  2 accumulation steps), gradient checkpointing off; the headline compares against the best of them.
- Both tokenize with steerlm's data functions (`load_mixture` -> `split_by_group` ->
  `tokenize_rated`, template/max_length/over_length=skip from the same Hydra config), so they train
  on identical token ids. AdamW (lr 1e-5, wd 0.1 on >=2-D params, betas, eps 1e-8), constant LR,
  no warmup, grad-norm clip 1.0, seed, threads (OMP_NUM_THREADS = torch threads = all cores).

How it is measured: each side runs in its own subprocess. Time per step is the interval between
consecutive step ends (steerlm: the timestamps of its per-step records in metrics.jsonl; HF: a
callback's `on_step_end`), so every per-step cost (collation, forward, backward, clip, AdamW,
logging) is inside. Step 1 (warm-up: allocator, first kernels) is excluded from the headline
tokens/s = non-pad tokens of steps 2..N / seconds of steps 2..N; the all-steps figure is shown too.
Non-pad tokens: steerlm's batches are recomputed here with its own `global_batches` (a pure
function of seed and lengths) and cross-checked against its summary; HF's are summed from the
attention masks its `compute_loss` receives. Peak memory: the process's peak RSS during training
(`ru_maxrss`; `torch.cuda.max_memory_allocated` on GPU). The machine must be otherwise idle: the
CPU time other processes used during each side is printed (from /proc/stat), with a warning when
it exceeds 0.2 cores (such a side is rerun, `--retries`). Batch composition differs by design
(steerlm's grouped batches vs random ones), so per-step non-pad/padded token counts and seconds
are printed too. Rounds are interleaved (steerlm, every HF setting, then again; `--rounds`, default 2) and each
side's tokens/s is the median of its rounds. Token counting is the same on both sides and asserted: steerlm's
recomputed batches must sum to its summary's `train_tokens`. The ratio against HF's default setting is printed
before the last line,
`RESULT speedup_vs_hf_trainer_best=<steerlm tokens/s / the best HF setting's tokens/s> target=1.3`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3
TAG = "BENCH_JSON "


def overrides(args, model_path: str, run_dir: str, cuda: bool) -> list[str]:
    """The recipe overrides; the HF side composes the same config to get the same data and optimizer."""
    return [f"model.path={model_path}", "model.freeze_backbone=false", f"run_dir={run_dir}", "resume=never",
            f"engine.precision={'bf16' if cuda else 'fp32'}", f"train.max_steps={args.steps}",
            f"train.global_batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}",
            "train.save_every=0", "train.eval_every=0", "train.log_every=1", f"eval.val_fraction={args.val_fraction}",
            f"max_length={args.max_length}", "over_length=skip", "optim.lr=1e-5", "optim.warmup_steps=0",
            "optim.schedule=constant"]


def train_samples(ovr: list[str], tokenizer):
    """The exact training samples the stage builds (same functions, same config)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from steerlm.attributes import get_schema
    from steerlm.data.sources import load_mixture
    from steerlm.data.split import split_by_group
    from steerlm.stages.reward_data import tokenize_rated

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("reward", overrides=ovr)
    schema = get_schema(cfg.schema)
    conversations, _ = load_mixture([OmegaConf.to_container(s, resolve=True) for s in cfg.data.train], schema)
    train_conv, _ = split_by_group(conversations, cfg.eval.val_fraction, cfg.seed)
    train, _ = tokenize_rated(train_conv, schema, tokenizer, template=cfg.template, max_length=cfg.max_length,
                              over_length=cfg.over_length)
    return cfg, schema, train


def hf_tokenizer(model_dir: str, pad_token=None):
    """Plain AutoTokenizer with steerlm's pad rule: the tokenizer's pad token, else its eos token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if pad_token is not None:
        tok.pad_token = pad_token
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def row(name: str, tokens: list[int], padded: list[int], ends: list[float], t_begin: float, peak_mb: float) -> dict:
    """Per-step token counts and step-end times -> one table row (steady state = steps 2..N)."""
    n = len(tokens)
    steady_s = ends[-1] - ends[0] if n > 1 else ends[-1] - t_begin
    steady_tok = sum(tokens[1:]) if n > 1 else tokens[0]
    return {"trainer": name, "steps": n, "non_pad_tokens": sum(tokens), "padded_tokens": sum(padded),
            "pad_fraction": round(1 - sum(tokens) / sum(padded), 4), "steady_seconds": round(steady_s, 3),
            "tokens_per_s": round(steady_tok / steady_s, 1),
            "all_steps_tokens_per_s": round(sum(tokens) / (ends[-1] - t_begin), 1), "peak_mem_mb": round(peak_mb, 1),
            "step_seconds": [round(b - a, 3) for a, b in zip([t_begin] + ends[:-1], ends)],
            "step_tokens": tokens, "step_padded_tokens": padded}


# ===== The peer: HF Trainer (runs in its own process) =============================================
def hf_worker(args) -> None:
    import torch
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from steerlm.engines.torch_engine import peak_memory_mb
    from steerlm.losses import masked_mse

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    tok = hf_tokenizer(args.model_path)
    cfg, schema, train = train_samples(json.loads(args.hf_overrides), tok)
    dataset = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in train]
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_path, num_labels=len(schema), problem_type="regression", dtype=torch.float32,
        attn_implementation=cfg.model.attn_implementation)
    model.config.pad_token_id = tok.pad_token_id
    counts = []

    class MaskedMSETrainer(Trainer):
        """HF Trainer with steerlm's masked MSE (HF's regression MSE would fit the -100 markers)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            mask = inputs["attention_mask"]
            counts.append((mask.sum(), mask.numel()))  # tensors: no device sync inside the step
            out = model(**inputs)
            loss = masked_mse(out.logits.float(), labels, labels != schema.missing).mean()
            return (loss, out) if return_outputs else loss

    class Clock(TrainerCallback):
        t_begin, ends, peak = 0.0, [], 0.0

        def on_train_begin(self, *a, **k):
            Clock.t_begin = time.time()

        def on_step_end(self, *a, **k):
            Clock.ends.append(time.time())
            Clock.peak = max(Clock.peak, peak_memory_mb(torch.device("cuda" if cuda else "cpu")))

    targs = TrainingArguments(
        output_dir=args.hf_out, per_device_train_batch_size=args.hf_micro_batch,
        gradient_accumulation_steps=args.batch_size // args.hf_micro_batch, gradient_checkpointing=False,
        max_steps=args.steps, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=1e-8, optim="adamw_torch",
        max_grad_norm=cfg.optim.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0, seed=cfg.seed,
        train_sampling_strategy=args.hf_worker, report_to=[], save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda, disable_tqdm=True)
    trainer = MaskedMSETrainer(model=model, args=targs, train_dataset=dataset, processing_class=tok,
                               data_collator=DataCollatorWithPadding(tok), callbacks=[Clock()])
    trainer.train()
    name = f"hf_trainer ({args.hf_worker}, micro {args.hf_micro_batch})"
    acc = args.batch_size // args.hf_micro_batch  # compute_loss runs once per micro-batch: sum them per step
    counts = [(sum(int(a) for a, _ in counts[i:i + acc]), sum(int(b) for _, b in counts[i:i + acc]))
              for i in range(0, len(counts), acc)]
    r = row(name, [a for a, _ in counts], [b for _, b in counts], Clock.ends, Clock.t_begin, Clock.peak)
    print(TAG + json.dumps(r), flush=True)


# ===== The parent: runs both sides and compares ===================================================
def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def run_child(cmd: list[str], env: dict, what: str) -> tuple[str, float, float]:
    """Run one side -> (stdout, cores it kept busy on average, cores other processes kept busy meanwhile)."""
    t0, b0, c0 = time.time(), busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    c1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.time() - t0
    mine = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    others = max(0.0, busy_cpu_seconds() - b0 - mine) / wall
    print(f"  {what}: done in {wall:.0f} s, {mine / wall:.2f} cores busy, other processes {others:.2f}", flush=True)
    if others > 0.2:
        print(f"  WARNING: other processes used {others:.2f} cores during this run: its timings are not reliable")
    return proc.stdout, round(mine / wall, 2), round(others, 2)


def run_hf(args, setting: tuple[str, int], model_path: str, ovr: list[str], tmp: str, env: dict) -> dict:
    strategy, micro = setting
    out, cores, others = run_child([sys.executable, __file__, "--hf-worker", strategy, "--hf-micro-batch", str(micro),
                                    "--model-path", model_path, "--hf-overrides", json.dumps(ovr),
                                    "--hf-out", str(Path(tmp) / f"hf_{strategy}_{micro}"),
                                    "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                    "--threads", str(args.threads)], env, f"hf_trainer ({strategy}, micro {micro})")
    line = next(x for x in reversed(out.splitlines()) if x.startswith(TAG))
    return {**json.loads(line[len(TAG):]), "cores": cores, "others": others}


def least_disturbed(args, side) -> dict:
    """Run a side; rerun it (up to --retries times) while other processes competed for the CPU."""
    best = None
    for attempt in range(1 + args.retries):
        r = side()
        best = r if best is None or r["others"] < best["others"] else best
        if r["others"] <= 0.2:
            break
        if attempt < args.retries:
            print("  rerunning it", flush=True)
    return best


def run_steerlm(args, ovr: list[str], run_dir: Path, env: dict, train: list[dict], cfg) -> dict:
    from steerlm.data.batching import global_batches
    from steerlm.logging import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)  # a retry starts clean (metrics.jsonl is appended to)
    _, cores, others = run_child([sys.executable, str(REPO / "recipes" / "train_reward.py"), *ovr], env,
                                 "steerlm (recipes/train_reward.py)")
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    lengths = [len(s["input_ids"]) for s in train]
    assert summary["data"]["train"]["kept"] == len(train), "steerlm trained on a different sample set"
    batches, epoch = [], 0
    while len(batches) < args.steps:  # the stage's own batch order (a pure function of seed, epoch, lengths)
        batches += global_batches(lengths, cfg.train.global_batch_size, seed=cfg.seed, epoch=epoch,
                                  group_by_length=cfg.train.group_by_length)
        epoch += 1
    batches = batches[:args.steps]
    tokens = [sum(lengths[i] for i in b) for b in batches]
    padded = [len(b) * max(lengths[i] for i in b) for b in batches]
    # the same counting on both sides: non-pad tokens of the samples each step trained on (HF: its attention masks)
    assert summary["train_tokens"] == sum(tokens), f"steerlm tokens {sum(tokens)} vs its summary {summary['train_tokens']}"
    ends = [r["time"] for r in recs]
    t_begin = ends[0] - tokens[0] / recs[0]["train/tokens_per_s"]  # step 1's own in-loop duration
    return {**row("steerlm", tokens, padded, ends, t_begin, max(r["train/peak_mem_mb"] for r in recs)),
            "cores": cores, "others": others}


def merge_rounds(runs: list[dict]) -> dict:
    """One side over the rounds: the median round's tokens/s (the last round's per-step detail)."""
    import statistics

    out = dict(runs[-1])
    out["round_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    out["tokens_per_s"] = round(statistics.median(out["round_tokens_per_s"]), 1)
    out["all_steps_tokens_per_s"] = round(statistics.median(r["all_steps_tokens_per_s"] for r in runs), 1)
    out["others"] = max(r["others"] for r in runs)
    out["peak_mem_mb"] = max(r["peak_mem_mb"] for r in runs)
    return out


def print_table(rows: list[dict]) -> None:
    cols = [("trainer", "trainer", "{}"), ("steps", "steps", "{}"), ("samples", "samples", "{}"),
            ("non_pad_tokens", "non-pad tok", "{}"), ("padded_tokens", "padded tok", "{}"),
            ("pad_fraction", "pad frac", "{:.1%}"), ("steady_seconds", "s (2..N)", "{:.2f}"),
            ("tokens_per_s", "tok/s (2..N)", "{:.1f}"), ("all_steps_tokens_per_s", "tok/s (all)", "{:.1f}"),
            ("peak_mem_mb", "peak MB", "{:.0f}")]
    render_table(rows, cols)


def render_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """Print rows as an aligned table; cols = (key, header, format)."""
    cells = [[h for _, h, _ in cols]] + [[f.format(r[k]) for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(c, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="model spec/dir, or 'tiny'")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--retries", type=int, default=1, help="reruns of a side disturbed by other processes")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds: steerlm, then every HF setting, again")
    ap.add_argument("--hf-samplers", default="random,group_by_length", help="HF Trainer samplers swept")
    ap.add_argument("--hf-micro-batches", default="", help="HF micro-batches swept (gradient accumulation makes up "
                    "the batch); default: the batch and half of it")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--hf-worker", choices=["random", "group_by_length"], help=argparse.SUPPRESS)
    ap.add_argument("--hf-micro-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--hf-overrides", help=argparse.SUPPRESS)
    ap.add_argument("--hf-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker(args)

    import torch

    from steerlm.models.embedded import resolve_model_path

    cuda = torch.cuda.is_available()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="bench_reward_") as tmp:
        if args.model == "tiny":
            spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            model_path = str(mod.make_tiny_model(Path(tmp) / "tiny_llama"))
        else:
            model_path = resolve_model_path(args.model)  # converts the embedded GGUF once, outside the timed runs
        run_dir = Path(tmp) / "steerlm_run"
        ovr = overrides(args, model_path, str(run_dir), cuda)
        cfg, _, train = train_samples(ovr, hf_tokenizer(model_path, None))
        print(f"bench_reward: model {args.model} ({model_path}), {len(train)} train samples <= {args.max_length} "
              f"tokens, {args.steps} steps x batch {args.batch_size}, {args.threads} threads, "
              f"{'cuda bf16' if cuda else 'cpu fp32'}", flush=True)
        micros = [int(m) for m in args.hf_micro_batches.split(",") if m] or sorted({args.batch_size,
                                                                                  max(1, args.batch_size // 2)})
        settings = [(sampler, m) for sampler in args.hf_samplers.split(",") for m in micros
                    if args.batch_size % m == 0]
        rounds = []  # interleaved: steerlm, HF setting 1, 2, ..., then again, so slow drift hits every side alike
        for k in range(args.rounds):
            print(f"round {k + 1}/{args.rounds}", flush=True)
            got = [least_disturbed(args, lambda: run_steerlm(args, ovr, run_dir, env, train, cfg))]
            got += [least_disturbed(args, lambda: run_hf(args, st, model_path, ovr, tmp, env)) for st in settings]
            rounds.append(got)
    rows = [merge_rounds([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    for r in rows:
        r["samples"] = r["steps"] * args.batch_size
    print(f"\nreward-model training throughput over {args.rounds} interleaved rounds (tokens = non-pad tokens "
          f"trained on; tok/s (2..N) excludes warm-up step 1, the median of the rounds; peak = "
          f"{'max CUDA allocated' if cuda else 'peak RSS of the side' + chr(39) + 's process'})")
    print_table(rows)
    for r in rows:
        steps = ", ".join(f"{t}/{p} {s:.2f}s" for t, p, s in zip(r["step_tokens"], r["step_padded_tokens"],
                                                                  r["step_seconds"]))
        print(f"  {r['trainer']} steps of its last round (non-pad/padded tokens, seconds): {steps}")
        print(f"    tok/s per round {r['round_tokens_per_s']}; other processes {r['others']} cores")
    best = max(rows[1:], key=lambda r: r["tokens_per_s"])
    default = next(r for r in rows[1:] if r["trainer"].startswith(f"hf_trainer (random, micro {args.batch_size})"))
    speedup = rows[0]["tokens_per_s"] / best["tokens_per_s"]
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "speedup_vs_hf_trainer_best": speedup,
                                              "best_peer_setting": best["trainer"], "target": TARGET}, indent=2) + "\n")
    print(f"against HF Trainer's default setting ({default['trainer']}): "
          f"{rows[0]['tokens_per_s'] / default['tokens_per_s']:.2f}x")
    print(f"best peer setting: {best['trainer']}")
    print(f"RESULT speedup_vs_hf_trainer_best={speedup:.2f} target={TARGET}")


if __name__ == "__main__":
    main()
