"""The pipeline report: `report.md` and `report.html` in the run dir, from what each stage wrote.

Sources, per stage dir: `steerlm_stage.json` (resolved config, wall time), `summary.json` (tokens/s,
peak memory), reward `eval_metrics.json`, label `labeled.jsonl` (the label distribution is counted
here), sft `metrics.jsonl` (loss curve), evaluate `steerability.json` / `samples.jsonl` / `.png`, steerlm2 and
ppo `summary.json` (distance, reward and KL curves).
Nothing is re-measured; a stage without outputs gets a line saying so.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

from .attributes import AttributeSchema
from .checkpoint import write_text_atomic
from .logging import read_metrics
from .pipeline import ORDER, RECORD, read_record
from .report_render import plot_distributions, plot_loss_curve, plot_panels, to_html, to_markdown

# The settings a reader needs to interpret each stage (the full config is in <stage>/steerlm_stage.json).
KEY_SETTINGS = {
    "reward": ["model.path", "model.freeze_backbone", "template", "max_length", "loss.type", "optim.lr",
               "train.epochs", "train.max_steps", "train.global_batch_size", "engine.precision"],
    "label": ["rm", "input", "max_length", "over_length", "engine.precision"],
    "sft": ["model.path", "template", "model.lora.enabled", "model.lora.r", "optim.lr", "train.max_steps",
            "train.global_batch_size", "max_length", "pack_length", "attribute_dropout", "engine.precision"],
    "evaluate": ["model.path", "rm", "attributes", "levels", "n_prompts", "generation.max_new_tokens",
                 "generation.do_sample"],
    "steerlm2": ["policy", "rm", "n_prompts", "n_samples", "targets", "iterations", "generation.temperature",
                 "likelihood.concentration", "likelihood.bins", "optim.lr", "train.epochs", "train.groups_per_step"],
    "ppo": ["policy", "rm", "reward.weights", "reward.standardize_from", "steps", "rollout_batch", "ppo_epochs",
            "kl_coef", "optim.actor_lr", "optim.critic_lr", "lora.r", "generation.max_new_tokens"],
}


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<unset>"
        d = d[k]
    return json.dumps(d) if isinstance(d, (list, dict, type(None))) else d


def duration(seconds) -> str:
    if seconds is None:
        return "n/a"
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{seconds:.1f} s"


def whole(v) -> Optional[int]:
    return None if v is None else round(v)


def stage_numbers(stage: str, d: Path) -> dict:
    """{tokens_per_s, tokens_what, peak_mem_mb} from a stage's own summary."""
    if stage == "evaluate":
        s = _load(d / "steerability.json") or {}
        g = s.get("generation_stats", {})
        return {"tokens_per_s": g.get("tokens_per_s"), "what": "generated", "peak_mem_mb": s.get("peak_mem_mb")}
    s = _load(d / "summary.json") or {}
    if stage == "steerlm2":
        last = (s.get("iterations") or [{}])[-1]
        return {"tokens_per_s": last.get("train_tokens_per_s"), "what": "trained on (listwise)",
                "peak_mem_mb": last.get("peak_mem_mb")}
    if stage == "ppo":
        return {"tokens_per_s": s.get("train_tokens_per_s"), "what": "trained on (PPO updates)",
                "peak_mem_mb": s.get("peak_mem_mb")}
    if stage == "reward":
        frozen = s.get("frozen_backbone")
        return {"tokens_per_s": s.get("feature_tokens_per_s" if frozen else "train_tokens_per_s"),
                "what": "feature forward (frozen backbone)" if frozen else "trained", "peak_mem_mb": s.get("peak_mem_mb")}
    if stage == "label":
        return {"tokens_per_s": s.get("tokens_per_s_per_rank"), "what": "scored, per rank",
                "peak_mem_mb": s.get("peak_mem_mb")}
    return {"tokens_per_s": s.get("tokens_per_s"), "what": "non-pad, trained on", "peak_mem_mb": s.get("peak_mem_mb")}


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.node()}: {cores} CPU cores, {dev}; python {platform.python_version()}, torch {torch.__version__}")


# ===== sections ==================================================================================
def reward_section(d: Path) -> list:
    ev = _load(d / "eval_metrics.json")
    if ev is None:
        return [("p", "no eval_metrics.json")]
    rows = [[a, m.get("n"), m.get("mse"), m.get("baseline_mse"), m.get("mae"), m.get("pearson"), m.get("spearman")]
            for a, m in ev["attributes"].items()]
    blocks = [("p", "Held-out metrics per attribute (baseline: always predicting the train mean)."),
              ("table", ["attribute", "n", "MSE", "baseline MSE", "MAE", "Pearson", "Spearman"], rows)]
    pairs = ev.get("pairwise_accuracy") or {}
    if pairs:
        blocks.append(("table", ["pairs", "accuracy", "n"],
                       [[k, v.get("accuracy"), v.get("pairs")] for k, v in pairs.items()]))
    blocks.append(("p", f"Beats the train-mean baseline on: {', '.join(ev.get('beats_baseline') or []) or 'none'}."))
    return blocks


def label_distribution(labeled: Path, levels: list[int]) -> dict[str, dict]:
    """Per attribute: count of assistant turns at each integer level, and the mean RM score."""
    counts: dict[str, list[int]] = {}
    sums: dict[str, float] = {}
    with open(labeled) as fh:
        for line in fh:
            for turn in json.loads(line)["turns"]:
                for a, v in (turn.get("labels") or {}).items():
                    c = counts.setdefault(a, [0] * len(levels))
                    if v is not None and int(v) in levels:
                        c[levels.index(int(v))] += 1
                for a, v in (turn.get("scores") or {}).items():
                    sums[a] = sums.get(a, 0.0) + v
    return {a: {"counts": c, "mean_score": sums.get(a, 0.0) / max(sum(c), 1)} for a, c in counts.items()}


def label_section(d: Path, out_dir: Path) -> list:
    s = _load(d / "summary.json")
    labeled = next(iter(sorted(d.glob("labeled.jsonl"))), None)
    if s is None or labeled is None:
        return [("p", "no labeled.jsonl (a parquet output is not summarized here)")]
    schema = AttributeSchema.load(d)
    levels = list(range(int(schema.scale_min), int(schema.scale_max) + 1))
    dist = label_distribution(labeled, levels)
    skipped = ", ".join(f"{k} {v}" for k, v in (s.get("skipped") or {}).items()) or "none"
    blocks = [("p", f"{s['rows']} conversations, {s['turns_scored']} assistant turns scored "
                    f"({s.get('tokens')} tokens); skipped turns: {skipped}; truncated: {s.get('truncated_left', 0)}."),
              ("table", ["attribute", "mean RM score"] + [f"label {lv}" for lv in levels],
               [[a, v["mean_score"], *v["counts"]] for a, v in dist.items()])]
    if dist:
        png = out_dir / "label_distribution.png"
        plot_distributions({a: v["counts"] for a, v in dist.items()}, levels, png)
        blocks.append(("img", png, "label distribution per attribute (assistant turns)"))
    return blocks


def sft_section(d: Path, out_dir: Path) -> list:
    s = _load(d / "summary.json")
    if s is None:
        return [("p", "no summary.json")]
    blocks = [("p", f"{s['steps']} steps, {s['tokens']} non-pad tokens ({s['trained_tokens']} trained), packing "
                    f"efficiency {s['packing_efficiency']:.1%}, {s['trainable_params']:,} trainable parameters, "
                    f"validation loss {s.get('validation_loss')}.")]
    metrics = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []
    train = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
    val = [(m["step"], m["validation/loss"]) for m in metrics if "validation/loss" in m]
    if train:
        png = out_dir / "sft_loss.png"
        plot_loss_curve(train, val, png, "SFT loss")
        blocks.append(("img", png, "SFT training loss per optimizer step and the final validation loss"))
    return blocks


def evaluate_section(d: Path, n_examples: int, max_chars: int) -> list:
    s = _load(d / "steerability.json")
    if s is None:
        return [("p", "no steerability.json")]
    rows = [[a, m["n"], m["spearman"], m["pearson"], m["slope"], m["length_spearman"],
             " ".join(fmt_opt(v) for v in m["measured_mean"]), " ".join(fmt_opt(v, 0) for v in m["length_mean"])]
            for a, m in s["attributes"].items()]
    blocks = [("p", f"Each attribute requested at levels {s['levels']} on {s['n_prompts']} prompts, the others at the "
                    f"model's defaults; responses rated by the stage-1 RM. Spearman/Pearson/slope: requested vs "
                    f"RM-measured; length rho: requested vs response tokens."),
              ("table", ["attribute", "n", "Spearman", "Pearson", "slope", "length rho",
                         "mean RM score per level", "mean tokens per level"], rows)]
    if (d / "steerability.png").exists():
        blocks.append(("img", d / "steerability.png", "RM-measured attribute vs requested level (SEM bars)"))
    samples = [json.loads(x) for x in open(d / "samples.jsonl")] if (d / "samples.jsonl").exists() else []
    lo, hi = min(s["levels"]), max(s["levels"])
    cut = lambda t: t if len(t) <= max_chars else t[:max_chars] + " [...]"
    ex = []
    for a in s["attributes"]:
        by = {(x["prompt_id"], x["level"]): x for x in samples if x["attribute"] == a}
        for pid in list(dict.fromkeys(x["prompt_id"] for x in samples if x["attribute"] == a))[:n_examples]:
            if (pid, lo) in by and (pid, hi) in by:
                ex.append([a, cut(by[(pid, lo)]["prompt"]), cut(by[(pid, lo)]["response"]), cut(by[(pid, hi)]["response"])])
    if ex:
        blocks += [("h", 3, "Example generations: lowest vs highest requested level"),
                   ("table", ["attribute", "prompt", f"level {lo}", f"level {hi}"], ex)]
    return blocks


def steerlm2_section(d: Path, out_dir: Path) -> list:
    s = _load(d / "summary.json")
    if s is None:
        return [("p", "no summary.json")]
    rows, curve, step = [], [], 0
    for it in s["iterations"]:
        g, dist = it.get("groups") or {}, it.get("distance") or []
        samp = it.get("sampling") or {}
        rows.append([it["iteration"], g.get("groups"), g.get("responses"), it.get("steps"),
                     dist[0] if dist else None, dist[-1] if dist else None, samp.get("tokens_per_s"),
                     it.get("train_tokens_per_s"), json.dumps(it.get("dropped") or {})])
        curve += [(step + k + 1, v) for k, v in enumerate(dist)]
        step += len(dist)
    blocks = [("table", ["iteration", "groups", "responses", "steps", "distance (first step)", "distance (last step)",
                         "sampling tok/s", "training tok/s", "dropped"], rows)]
    if curve:
        png = out_dir / "steerlm2_distance.png"
        plot_loss_curve(curve, [], png, "SteerLM 2.0", ylabel="distance KL(w' || b')")
        blocks.append(("img", png, "distance per optimizer step (each step: new prompt groups)"))
    if s.get("steerability"):
        blocks.append(("table", ["attribute", "Spearman before", "Spearman after", "length rho before", "length rho after"],
                       [[a, v["before"], v["after"], v["length_before"], v["length_after"]]
                        for a, v in s["steerability"].items()]))
    return blocks


def ppo_section(d: Path, out_dir: Path) -> list:
    s = _load(d / "summary.json")
    if s is None:
        return [("p", "no summary.json")]
    h, st = s["held_out_reward"], s["standardisation"]
    blocks = [("p", f"Reward r = (w · RM − {st['mean']:.3f}) / {st['std']:.3f} (μ, σ from {st['from']}). "
                    f"{s['prompts']['train']} training prompts, {s['prompts']['skipped_over_max_prompt_tokens']} "
                    f"skipped as longer than max_prompt_tokens. Rollouts generated at {s['generated_tokens_per_s']} tok/s."),
              ("table", ["held-out prompts", "reward before (greedy)", "reward after (greedy)", "change"],
               [[h["prompts"], h["before"], h["after"],
                 None if h["before"] is None or h["after"] is None else h["after"] - h["before"]]])]
    steps = range(1, len(s["reward_curve"]) + 1)
    png = out_dir / "ppo_curves.png"
    plot_panels({"reward (mean over rollouts, ± std)": list(zip(steps, s["reward_curve"])),
                 "KL(π ‖ π_ref) per response (nats)": list(zip(steps, s["kl_curve"])),
                 "policy entropy per token": [(k, e) for k, e in zip(steps, s["entropy_curve"]) if e is not None]},
                png, "PPO", xlabel="PPO step",
                bands={"reward (mean over rollouts, ± std)": s["reward_std_curve"]})
    blocks.append(("img", png, "per PPO step: rollout reward, KL to the reference policy, entropy"))
    return blocks


def fmt_opt(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# ===== the report ================================================================================
def write_report(run_dir: str | os.PathLike, stage_dirs: dict[str, Path], results: list[dict], *,
                 examples: int = 2, max_chars: int = 600) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    this_run = {r["stage"]: r["action"] for r in results}
    records = {n: read_record(stage_dirs[n]) for n in ORDER}
    total = sum(r["wall_time_s"] or 0 for r in results if r["action"] != "skip")
    blocks = [("h", 1, f"steerlm pipeline report: {run_dir}"),
              ("p", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} on {machine()}. "
                    + (f"This invocation ran {duration(total)} of stages." if total else
                       "Nothing ran in this invocation: every selected stage was up to date.")),
              ("table", ["stage", "this invocation", "wall time", "tokens/s", "tokens counted", "peak memory (MB)"],
               [[n, this_run.get(n, "not selected"), duration((records[n] or {}).get("wall_time_s")),
                 *(lambda x: [whole(x["tokens_per_s"]), x["what"], whole(x["peak_mem_mb"])])(stage_numbers(n, stage_dirs[n]))]
                for n in ORDER if records[n] or n in this_run]),
              ("p", "Wall time is the stage's last run (a resumed stage: the resumed part). Peak memory is the "
                    "accelerator memory allocated on GPU; on CPU it is the pipeline process's peak RSS during the "
                    "stage, which includes heap the allocator kept from the stage before (the stages share one "
                    "process).")]
    sections = {"reward": lambda d: reward_section(d), "label": lambda d: label_section(d, run_dir),
                "sft": lambda d: sft_section(d, run_dir),
                "evaluate": lambda d: evaluate_section(d, examples, max_chars),
                "steerlm2": lambda d: steerlm2_section(d, run_dir), "ppo": lambda d: ppo_section(d, run_dir)}
    titles = {"reward": "Stage 1: attribute reward model", "label": "Stage 2: labels",
              "sft": "Stage 3: attribute-conditioned SFT", "evaluate": "Steerability",
              "steerlm2": "SteerLM 2.0", "ppo": "PPO from the attribute reward model"}
    for n in ORDER:
        d, rec = stage_dirs[n], records[n]
        if rec is None and n not in this_run:
            continue  # an optional stage that was never selected
        blocks.append(("h", 2, titles[n]))
        if rec is None or rec.get("status") != "complete":
            blocks.append(("p", f"not complete in {d} ({'no record' if rec is None else rec.get('status')})."))
            continue
        cfg = rec.get("resolved_config", {})
        blocks += [("p", f"Output: {d}. Full config: {d / RECORD}. Wall time {duration(rec.get('wall_time_s'))}"
                         f"{' (resumed)' if rec.get('resumed') else ''}."),
                   ("table", ["setting", "value"], [[k, _get(cfg, k)] for k in KEY_SETTINGS[n]])]
        blocks += sections[n](d)
    md = run_dir / "report.md"
    write_text_atomic(md, to_markdown(blocks, run_dir))
    write_text_atomic(run_dir / "report.html", to_html(blocks, f"steerlm report {run_dir}"))
    return md

