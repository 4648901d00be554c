"""Steerability evaluation: does the model's output move when an attribute value in its prompt moves?

For each evaluated attribute a and each requested level l (all other attributes at the card's
defaults), the model answers every prompt; the stage-1 reward model then rates each response, and
the response length is counted in tokens. A steerable model has RM-measured a rising with l:

- `spearman`: Spearman rank correlation of (requested l, measured a) over all samples of a — the
  headline number (scale-free: the RM's raw scores need not match the 0-4 labels exactly);
- `pearson` and `slope` (OLS of measured on requested; 1.0 = one measured point per requested point);
- per level: mean measured a with its standard error, mean length in tokens;
- `length_spearman`: Spearman(requested l, length) — for verbosity this is the RM-free check.

Prompts are the first user turns of the first `n_prompts` unique prompts of a data mixture. All
generations go through one batched `generate` call and all ratings through one `RewardScorer.score`
call. Outputs in `output_dir`: `steerability.json` (atomic), `samples.jsonl`, `steerability.png`.

Raises:
    ConfigError: an attribute that the model cannot steer or the RM was not trained on; bad levels.
    DataError: a prompt set without usable prompts.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import stats as sps

from ..attributes import AttributeSchema
from ..checkpoint import write_text_atomic
from ..report_render import save_figure
from ..data.sources import load_mixture
from ..engines import torch_engine as te
from ..errors import ConfigError, DataError
from ..scoring import RewardScorer, ScoreStats
from .generate import SteerableModel, steering_spec


# ===== inputs ====================================================================================
def load_prompts(specs: Sequence[dict], schema: AttributeSchema, n_prompts: int) -> list[dict]:
    """The first user turn of the first `n_prompts` unique (system, prompt) pairs: [{id, system, turns}]."""
    conversations, _ = load_mixture(specs, schema)
    seen, prompts = set(), []
    for c in conversations:
        first = c["turns"][0] if c["turns"] else None
        if first is None or first["role"] != "user" or (c["system"], first["content"]) in seen:
            continue
        seen.add((c["system"], first["content"]))
        prompts.append({"id": c["id"], "system": c["system"], "turns": [{"role": "user", "content": first["content"]}]})
        if len(prompts) == n_prompts:
            break
    if not prompts:
        raise DataError(", ".join(str(s.get("path")) for s in specs), None, None, "no conversation starts with a user turn")
    return prompts


def choose_attributes(requested: Optional[Sequence[str]], steerable: Sequence[str], rm_trained: Sequence[str]) -> list[str]:
    """null: every steerable attribute the RM can measure; else each one must be both."""
    if requested is None:
        chosen = [a for a in steerable if a in rm_trained]
        if not chosen:
            raise ConfigError(f"the RM was trained on none of the model's steerable attributes "
                              f"({', '.join(steerable)}; RM: {', '.join(rm_trained)})")
        return chosen
    for a in requested:
        if a not in steerable:
            raise ConfigError(f"attributes: {a!r} is not steerable in this model; steerable: {', '.join(steerable)}")
        if a not in rm_trained:
            raise ConfigError(f"attributes: the RM was not trained on {a!r}; it measures: {', '.join(rm_trained)}")
    return list(requested)


def check_levels(levels: Sequence, schema: AttributeSchema) -> list[int]:
    out = []
    for v in levels:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not schema.scale_min <= v <= schema.scale_max:
            raise ConfigError(f"levels: {v!r} is not an integer in [{schema.scale_min:g}, {schema.scale_max:g}]")
        out.append(int(v))
    if len(set(out)) < 2:
        raise ConfigError(f"levels: need at least two distinct levels to measure steering, got {list(levels)}")
    return out


# ===== the report ================================================================================
def _corr(fn, x: np.ndarray, y: np.ndarray) -> Optional[float]:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None  # undefined for constant inputs
    return float(fn(x, y)[0])


def _slope(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    if len(x) < 2 or np.var(x) == 0:
        return None
    return float(np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2))


def _mean_sem(v: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    if len(v) == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def steerability_report(samples: Sequence[dict], attributes: Sequence[str], levels: Sequence[int]) -> dict[str, dict]:
    """samples: [{attribute, level, tokens, stopped, scores: {attribute: float} | None}] -> {attribute: metrics}.

    Samples whose response the RM did not score (scores None, e.g. over_length=skip) count for
    length and `stopped` but not for the RM metrics.
    """
    report = {}
    for a in attributes:
        rows = [s for s in samples if s["attribute"] == a]
        scored = [s for s in rows if s.get("scores") is not None]
        x = np.array([s["level"] for s in scored], dtype=np.float64)
        y = np.array([s["scores"][a] for s in scored], dtype=np.float64)
        xl = np.array([s["level"] for s in rows], dtype=np.float64)
        length = np.array([s["tokens"] for s in rows], dtype=np.float64)
        per_level = {"measured_mean": [], "measured_sem": [], "length_mean": [], "length_sem": [], "n_per_level": []}
        for lev in levels:
            m, e = _mean_sem(y[x == lev])
            lm, le = _mean_sem(length[xl == lev])
            for k, v in zip(per_level, (m, e, lm, le, int((xl == lev).sum()))):
                per_level[k].append(v)
        report[a] = {
            "n": len(rows), "n_scored": len(scored),
            "spearman": _corr(sps.spearmanr, x, y), "pearson": _corr(sps.pearsonr, x, y), "slope": _slope(x, y),
            "length_spearman": _corr(sps.spearmanr, xl, length),
            "stopped_fraction": float(np.mean([s["stopped"] for s in rows])) if rows else None,
            "levels": list(levels), **per_level,
        }
    return report


def format_table(report: dict[str, dict]) -> str:
    f = lambda v, w=7: f"{'n/a':>{w}}" if v is None else f"{v:{w}.3f}"
    head = (f"{'attribute':<12} {'n':>4} {'spearman':>8} {'pearson':>7} {'slope':>7} {'len_rho':>7} {'stopped':>7}"
            "  mean RM score per level | mean length per level")
    rows = [head, "-" * len(head)]
    for a, m in report.items():
        measured = " ".join(f(v, 5) for v in m["measured_mean"])
        lengths = " ".join(f"{'n/a' if v is None else round(v):>4}" for v in m["length_mean"])
        rows.append(f"{a:<12} {m['n']:>4} {f(m['spearman'], 8)} {f(m['pearson'])} {f(m['slope'])} "
                    f"{f(m['length_spearman'])} {f(m['stopped_fraction'])}  {measured} | {lengths}")
    return "\n".join(rows)


def plot_steerability(report: dict[str, dict], path: Path) -> None:
    """One panel per attribute (mean RM score vs requested level, SEM bars, identity line); plus length vs
    requested verbosity. Rendered by matplotlib's Agg canvas (no pyplot, no display), written atomically."""
    from matplotlib.figure import Figure

    panels = [(a, "measured") for a in report] + ([("verbosity", "length")] if "verbosity" in report else [])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 3.4 * rows), layout="constrained")
    for k, (a, kind) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        m = report[a]
        lv = np.array(m["levels"], dtype=float)
        mean = np.array([np.nan if v is None else v for v in m[f"{kind}_mean"]], dtype=float)
        sem = np.array([0.0 if v is None else v for v in m[f"{kind}_sem"]], dtype=float)
        ax.errorbar(lv, mean, yerr=sem, marker="o", capsize=3)
        if kind == "measured":
            ax.plot([lv.min(), lv.max()], [lv.min(), lv.max()], "--", color="gray", label="identity")
            ax.set_ylabel(f"RM-measured {a}")
            rho = "n/a" if m["spearman"] is None else f"{m['spearman']:.2f}"
            ax.set_title(f"{a} (Spearman {rho})")
            ax.legend(loc="upper left", fontsize=8)
        else:
            ax.set_ylabel("response length (tokens)")
            rho = "n/a" if m["length_spearman"] is None else f"{m['length_spearman']:.2f}"
            ax.set_title(f"length vs verbosity (Spearman {rho})")
        ax.set_xlabel(f"requested {a}")
        ax.set_xticks(lv)
    save_figure(fig, path)


# ===== the recipe (recipes/evaluate.py) ==========================================================
def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    out_dir = Path(cfg.output_dir)
    model = SteerableModel.load(cfg.model.path, cfg.device, cfg.precision)
    scorer = RewardScorer(cfg.rm, device=str(model.device), precision=cfg.precision, batch_tokens=cfg.rm_batch_tokens,
                          over_length=cfg.rm_over_length)
    requested = OmegaConf.to_container(cfg.attributes, resolve=True) if cfg.attributes is not None else None
    if isinstance(requested, str):
        requested = [requested]
    attributes = choose_attributes(requested, model.steerable, scorer.trained_attributes)
    levels = check_levels(list(cfg.levels), model.schema)
    specs = [OmegaConf.to_container(s, resolve=True) for s in cfg.prompts]
    prompts = load_prompts(specs, model.schema, int(cfg.n_prompts))
    print(f"evaluate: {len(attributes)} attributes x {len(levels)} levels x {len(prompts)} prompts "
          f"= {len(attributes) * len(levels) * len(prompts)} generations on {model.device}", flush=True)

    jobs = [(a, lev, p) for a in attributes for lev in levels for p in prompts]
    options = OmegaConf.to_container(cfg.generation, resolve=True)
    spec = steering_spec(cfg, model)  # the same activation steering on every generation of the sweep
    outputs = model.generate([p for _, _, p in jobs], [{a: lev} for a, lev, _ in jobs], steering=spec, **options)
    score_stats = ScoreStats()
    scores = scorer.score([(p["system"], p["turns"] + [{"role": "assistant", "content": o["text"]}])
                           for (_, _, p), o in zip(jobs, outputs)], score_stats)
    samples = [{"attribute": a, "level": lev, "prompt_id": p["id"], "system": p["system"], "prompt": p["turns"][-1]["content"],
                "response": o["text"], "tokens": o["tokens"], "stopped": o["stopped"], "attributes": o["attributes"],
                "scores": s} for (a, lev, p), o, s in zip(jobs, outputs, scores)]
    report = steerability_report(samples, attributes, levels)

    result = {
        "model": str(cfg.model.path), "rm": str(cfg.rm), "attributes": report, "levels": levels,
        "steering": None if spec is None else spec.to_dict()[0],
        "n_prompts": len(prompts), "defaults": model.defaults, "generation": options,
        "generation_stats": model.stats.to_dict(), "rm_scoring": score_stats.to_dict(),
        "peak_mem_mb": round(te.peak_memory_mb(model.device), 1), "device": str(model.device),
        "wall_time_s": round(time.time() - t_start, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    plot_steerability(report, out_dir / "steerability.png")
    write_text_atomic(out_dir / "steerability.json", json.dumps(result, indent=2) + "\n")
    print(format_table(report))
    g = result["generation_stats"]
    print(f"generated {g['generated_tokens']} tokens in {g['seconds']} s ({g['tokens_per_s']} tokens/s); RM scored "
          f"{score_stats.scored}/{score_stats.inputs} ({score_stats.truncated_left} truncated, {score_stats.skipped_over_length} "
          f"skipped); peak {result['peak_mem_mb']} MB; {result['wall_time_s']} s")
    print(f"written to {out_dir}/steerability.json, samples.jsonl, steerability.png", flush=True)
    return result
