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
from .stage_table import ORDER, RECORD, read_record
from .report_render import plot_distributions, plot_intervals, plot_loss_curve, plot_panels, to_html, to_markdown
from .steerability import format_ci

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
    ls = s.get("level_steering")
    if ls:
        how = ("learned with the SFT loss (sft.level_steering.train; norms "
               + ", ".join(f"{a} {n:.1f}" for a, n in ls.get("norms", {}).items()) + ")") if ls.get("trained") else \
            f"built after training ({ls.get('seconds')} s)"
        c = ls["center"]
        center = f"c_a; c = {', '.join(f'{a} {v:.2f}' for a, v in c.items())}" if isinstance(c, dict) else f"{c:g}"
        blocks.append(("p", f"Level steering: the policy's own vectors for {', '.join(ls['attributes'])} at layer "
                            f"{ls['layer']}, {how}, saved in model/; a request's level l adds "
                            f"{ls['gain']:g} (l - {center}) v_a there, with the attribute string."))
    metrics = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []
    train = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
    val = [(m["step"], m["validation/loss"]) for m in metrics if "validation/loss" in m]
    if train:
        png = out_dir / "sft_loss.png"
        plot_loss_curve(train, val, png, "SFT loss")
        blocks.append(("img", png, "SFT training loss per optimizer step and the final validation loss"))
    curves = conditioning_curves(metrics)
    if curves:
        png = out_dir / "sft_conditioning.png"
        plot_intervals(curves, png, "conditioning strength vs trained tokens", xlabel="trained tokens",
                       ylabel="Spearman(decoded level, own label)")
        blocks.append(("img", png, "conditioning strength on held-out labeled responses (95% interval) as training "
                                   "proceeds; the first point is the base model"))
        blocks.append(("table", ["attribute", "trained tokens", "strength", "95% interval"],
                       [[a, pts[-1][0], pts[-1][1], f"[{fmt_opt(pts[-1][2])}, {fmt_opt(pts[-1][3])}]"]
                        for a, pts in curves.items()]))
    return blocks


def conditioning_curves(metrics: list[dict]) -> dict[str, list[tuple]]:
    """{attribute: [(trained tokens, strength, lo, hi)]} from the SFT metrics' conditioning/* lines."""
    curves: dict[str, list[tuple]] = {}
    for m in metrics:
        if "conditioning/trained_tokens" not in m:
            continue
        for k, v in m.items():
            a = k.removeprefix("conditioning/")
            if k.startswith("conditioning/") and not k.endswith(("_lo", "_hi")) and a not in ("trained_tokens", "seconds"):
                if v is not None:
                    curves.setdefault(a, []).append((m["conditioning/trained_tokens"], v, m.get(f"{k}_lo"), m.get(f"{k}_hi")))
    return curves


def evaluate_section(d: Path, n_examples: int, max_chars: int) -> list:
    s = _load(d / "steerability.json")
    if s is None:
        return [("p", "no steerability.json")]
    methods = s.get("methods") or {"ac_sft": {"attributes": s["attributes"], "side_effects": {}}}
    ac = methods["ac_sft"]
    rows = [[a, m["n"], format_ci(m.get("rm_ci")), format_ci(m.get("length_ci")), m.get("verdict"),
             " ".join(fmt_opt(v) for v in m["measured_mean"]), " ".join(fmt_opt(v, 0) for v in m["length_mean"])]
            for a, m in ac["attributes"].items()]
    blocks = [("p", f"Each attribute requested at levels {s['levels']} on {s['n_prompts']} prompts x "
                    f"{s.get('n_samples', 1)} sampled answers, the others at the model's defaults; every answer rated by "
                    f"the stage-1 RM. Intervals: 95% bootstrap, resampling prompts. An attribute is steered "
                    f"(verdict 'follows') only when its interval excludes 0."),
              ("table", ["attribute", "n", "Spearman(requested, RM-measured) [95% CI]",
                         "Spearman(requested, tokens) [95% CI]", "verdict", "mean RM score per level",
                         "mean tokens per level"], rows)]
    if (d / "steerability.png").exists():
        blocks.append(("img", d / "steerability.png", "RM-measured attribute and length vs requested level (SEM bars)"))
    if s.get("conditioning"):
        blocks += [("h", 3, "Conditioning strength (teacher-forced, no generation)")] + conditioning_blocks(s["conditioning"])
    if len(methods) > 1:
        blocks += [("h", 3, "AC-SFT vs just asking vs activation steering")] + comparison_blocks(methods)
    if ac.get("side_effects"):
        blocks += [("h", 3, "Side effects: what else moves (AC-SFT)"),
                   ("p", "Standardized slope of each measure per requested level (measure units / its standard "
                         "deviation over all answers), 95% interval. rm:* are RM scores; text:* are RM-free "
                         "(textstat counts; fk_grade = Flesch-Kincaid grade); tokens = response length.")]
        blocks += side_effect_blocks(ac["side_effects"])
    blocks += example_blocks(d, s, n_examples, max_chars)
    return blocks


def conditioning_blocks(c: dict) -> list:
    pol, base, string = c.get("policy") or {}, c.get("base") or {}, c.get("policy_string")
    rows = []
    for a, m in (pol.get("attributes") or {}).items():
        b = (base.get("attributes") or {}).get(a, {})
        alone = [format_ci(((string.get("attributes") or {}).get(a) or {}).get("strength"))] if string else []
        rows.append([a, m.get("n"), format_ci(m.get("strength")), m.get("verdict"), *alone, format_ci(b.get("strength")),
                     format_ci(m.get("length_strength")), fmt_opt(m.get("mean_abs_slope"), 3)])
    extra = (" The policy steers with its level vectors as well as the string (sft.level_steering); 'string alone' "
             "is the same policy without them.") if string else ""
    return [("p", "Held-out labeled responses scored under each requested level of an attribute, everything else "
                  "fixed; per response the level the model decodes (the posterior mean over the requested levels); "
                  "strength = Spearman(decoded level, the response's own label) over responses (0: the attribute "
                  "string is ignored; positive: the preference follows the label). The base model, given the same "
                  "attribute strings, is the control." + extra),
            ("table", ["attribute", "n", "policy strength [95% CI]", "verdict",
                       *(["policy, string alone [95% CI]"] if string else []), "base model strength [95% CI]",
                       "policy: Spearman(decoded, tokens)", "mean |slope| (nats/level)"], rows)]


def comparison_blocks(methods: dict) -> list:
    from .sweep import worst_side_effect

    rows = []
    attributes = list(methods["ac_sft"]["attributes"])
    for a in attributes:
        for name, res in methods.items():
            m = res["attributes"][a]
            worst = worst_side_effect(res.get("side_effects", {}), a)
            rows.append([a, name, format_ci(m.get("rm_ci")), format_ci(m.get("length_ci")), m.get("verdict"),
                         "none beyond noise" if worst is None else f"{worst[0]} {worst[1]:+.2f}"])
    best = {}
    for a in attributes:
        scored = [(res["attributes"][a].get("spearman"), n) for n, res in methods.items()
                  if res["attributes"][a].get("spearman") is not None]
        best[a] = max(scored)[1] if scored else "n/a"
    return [("p", "The same prompts answered by the AC-SFT policy (attribute string; with a checkpoint's level steering "
                  "its vectors too, and ac_sft_string: the string alone), by its base model told the level "
                  "in words (prompting), and by its base model steered by an attribute vector (activation). "
                  "Largest side effect: the other RM attribute with the largest standardized slope whose interval "
                  "excludes 0. Highest Spearman(requested, RM-measured): "
                  + ", ".join(f"{a}: {w}" for a, w in best.items()) + "."),
            ("table", ["attribute", "method", "Spearman(requested, RM) [95% CI]", "Spearman(requested, tokens) [95% CI]",
                       "verdict", "largest side effect (std slope)"], rows)]


def side_effect_blocks(matrix: dict) -> list:
    measures = list(next(iter(matrix.values())))
    rows = [[a] + [format_ci(row[m]["std_slope"]) for m in measures] for a, row in matrix.items()]
    return [("table", ["requested"] + measures, rows)]


def example_blocks(d: Path, s: dict, n_examples: int, max_chars: int) -> list:
    samples = [json.loads(x) for x in open(d / "samples.jsonl")] if (d / "samples.jsonl").exists() else []
    samples = [x for x in samples if x.get("method", "ac_sft") == "ac_sft" and x.get("sample", 0) == 0]
    lo, hi = min(s["levels"]), max(s["levels"])
    cut = lambda t: t if len(t) <= max_chars else t[:max_chars] + " [...]"
    ex = []
    for a in s["attributes"]:
        by = {(x["prompt_id"], x["level"]): x for x in samples if x["attribute"] == a}
        for pid in list(dict.fromkeys(x["prompt_id"] for x in samples if x["attribute"] == a))[:n_examples]:
            if (pid, lo) in by and (pid, hi) in by:
                ex.append([a, cut(by[(pid, lo)]["prompt"]), cut(by[(pid, lo)]["response"]), cut(by[(pid, hi)]["response"])])
    if not ex:
        return []
    return [("h", 3, "Example generations: lowest vs highest requested level"),
            ("table", ["attribute", "prompt", f"level {lo}", f"level {hi}"], ex)]


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
        ci = lambda v, k: format_ci(v.get(f"{k}_ci")) if v.get(f"{k}_ci") else fmt_opt(v.get(k))
        blocks.append(("p", "Steerability of the SFT policy (before) and of the SteerLM 2.0 policy (after), measured "
                            "with the same settings; 95% bootstrap intervals resampling prompts."))
        blocks.append(("table", ["attribute", "Spearman(requested, RM) before", "after", "Spearman(requested, tokens) "
                                 "before", "after", "conditioning before", "conditioning after"],
                       [[a, ci(v, "before"), ci(v, "after"), ci(v, "length_before"), ci(v, "length_after"),
                         format_ci(v.get("conditioning_before")), format_ci(v.get("conditioning_after"))]
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

