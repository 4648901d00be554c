"""Steerability evaluation: does the model's output move when an attribute value in its prompt moves, and
is training worth it against just asking?

1. **Sweep.** For each evaluated attribute a and requested level l (the others at the card's defaults), the
   policy answers every prompt `n_samples` times (sampled). The stage-1 RM rates every answer on every
   attribute it was trained on; RM-free text measures (words, Flesch-Kincaid grade, exclamations, ...) come
   from `steerability.text_measures`. Per attribute (`steerlm.sweep`): Spearman(l, RM-measured a) and
   Spearman(l, tokens) with 95% bootstrap intervals that resample prompts; an attribute counts as steered
   only when its interval excludes 0 (`verdict`).
2. **Side effects** (Chang et al., AAAI 2026): the requested-by-measured matrix of standardized slopes.
3. **Baselines** (`baselines.methods`, `steerlm.baselines`): the base instruct model told the level in words
   (`prompting`) and steered through its activations (`activation`), same prompts, same measures.
4. **Conditioning strength** (`conditioning`, `steerlm.conditioning`): teacher-forced, generation-free: does
   the policy's likelihood of held-out labeled responses follow their own labels? With the base model as
   the control.

Prompts are the first user turns of the first `n_prompts` unique prompts of a data mixture. Outputs in
`output_dir`: `steerability.json` (atomic), `samples.jsonl` (every answer with its measures), `steerability.png`.

Raises:
    ConfigError: an attribute that the model cannot steer or the RM was not trained on; bad levels.
    DataError: a prompt set without usable prompts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..attributes import AttributeSchema
from ..checkpoint import write_text_atomic
from ..report_render import save_figure
from ..data.sources import load_mixture
from ..engines import torch_engine as te
from ..errors import ConfigError, DataError
from .. import baselines as bl
from .. import sweep
from ..scoring import RewardScorer, ScoreStats
from ..steerability import format_ci, format_side_effects, sample_measures
from ..steerable import SteerableModel, steering_spec


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
def steerability_report(samples: Sequence[dict], attributes: Sequence[str], levels: Sequence[int], *,
                        n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """samples: [{attribute, level, tokens, stopped, scores: {attribute: float} | None, prompt_id?}] -> {attribute:
    metrics} (`steerlm.sweep.attribute_stats`: Spearman / Pearson / slope of RM-measured vs requested with
    prompt-clustered bootstrap intervals, length Spearman, per-level means). Samples whose response the RM did not
    score (scores None) count for length and `stopped` only."""
    with_measures = [{**s, "measures": {f"rm:{k}": v for k, v in (s.get("scores") or {}).items()}} for s in samples]
    return {a: sweep.attribute_stats(with_measures, a, levels, n_boot=n_boot, seed=seed) for a in attributes}


def format_table(report: dict[str, dict]) -> str:
    f = lambda v, w=7: f"{'n/a':>{w}}" if v is None else f"{v:{w}.3f}"
    head = (f"{'attribute':<12} {'n':>4} {'Spearman(l, RM) [95% CI]':>26} {'Spearman(l, tokens) [95% CI]':>30} "
            f"{'verdict':>8}  mean RM score per level | mean length per level")
    rows = [head, "-" * len(head)]
    for a, m in report.items():
        measured = " ".join(f(v, 5) for v in m["measured_mean"])
        lengths = " ".join(f"{'n/a' if v is None else round(v):>4}" for v in m["length_mean"])
        rows.append(f"{a:<12} {m['n']:>4} {format_ci(m['rm_ci']):>26} {format_ci(m['length_ci']):>30} "
                    f"{m['verdict'] or 'n/a':>8}  {measured} | {lengths}")
    return "\n".join(rows)


def format_conditioning(conditioning: dict) -> str:
    head = f"{'attribute':<12} {'model':<7} {'n':>4} {'strength [95% CI]':>22} {'vs length [95% CI]':>22} verdict"
    rows = [head, "-" * len(head)]
    for who, res in conditioning.items():
        if not isinstance(res, dict) or "attributes" not in res:
            continue
        for a, m in res["attributes"].items():
            rows.append(f"{a:<12} {who:<7} {m['n']:>4} {format_ci(m.get('strength')):>22} "
                        f"{format_ci(m.get('length_strength')):>22} {m.get('verdict') or 'n/a'}")
    return "\n".join(rows)


def plot_steerability(methods: dict[str, dict], path: Path) -> None:
    """One panel per attribute (mean RM score vs requested level, SEM bars, one line per method) and one of
    response length per level; rendered by matplotlib's Agg canvas, written atomically."""
    from matplotlib.figure import Figure

    attributes = list(next(iter(methods.values()))["attributes"])
    panels = [(a, "measured") for a in attributes] + [(a, "length") for a in attributes]
    cols = len(attributes)
    fig = Figure(figsize=(4 * cols, 6.8), layout="constrained")
    for k, (a, kind) in enumerate(panels):
        ax = fig.add_subplot(2, cols, k + 1)
        for name, res in methods.items():
            m = res["attributes"][a]
            lv = np.array(m["levels"], dtype=float)
            mean = np.array([np.nan if v is None else v for v in m[f"{kind}_mean"]], dtype=float)
            sem = np.array([0.0 if v is None else v for v in m[f"{kind}_sem"]], dtype=float)
            ci = m["rm_ci" if kind == "measured" else "length_ci"]
            ax.errorbar(lv, mean, yerr=sem, marker="o", capsize=3, label=f"{name}: rho {format_ci(ci)}")
            ax.set_xticks(lv)
        ax.set_ylabel(f"RM-measured {a}" if kind == "measured" else "response length (tokens)")
        ax.set_xlabel(f"requested {a}")
        ax.set_title(f"{a}: {'RM score' if kind == 'measured' else 'length'} per requested level", fontsize=10)
        ax.legend(loc="best", fontsize=7)
    save_figure(fig, path)


# ===== the recipe (recipes/evaluate.py) ==========================================================
def sweep_jobs(attributes: Sequence[str], levels: Sequence[int], prompts: Sequence[dict], n_samples: int) -> list[tuple]:
    """(attribute, level, prompt, sample index) for every answer of a sweep, in one fixed order."""
    return [(a, lev, p, k) for a in attributes for lev in levels for p in prompts for k in range(n_samples)]


def answer(model: SteerableModel, method: str, jobs: list[tuple], options: dict, *, prompts_of=None,
           attributes_of=None, steering_of=None, level_steering: bool = True) -> list[dict]:
    """Generate every job with `model` (one batched call) -> samples without measures yet."""
    prompts = [prompts_of(j) if prompts_of else j[2] for j in jobs]
    attrs = [attributes_of(j) if attributes_of else None for j in jobs]
    steering = [steering_of(j) for j in jobs] if steering_of else None
    outs = model.generate(prompts, attrs, steering=steering, level_steering=level_steering, **options)
    return [{"method": method, "attribute": a, "level": lev, "prompt_id": p["id"], "sample": k, "system": q.get("system"),
             "prompt": p["turns"][-1]["content"], "response": o["text"], "tokens": o["tokens"], "stopped": o["stopped"],
             "attributes": o["attributes"]} for (a, lev, p, k), q, o in zip(jobs, prompts, outs)]


def measure_samples(samples: list[dict], scorer: RewardScorer, stats: ScoreStats) -> None:
    """RM scores (every attribute the RM was trained on) and text measures, in place; one scoring call."""
    scores = scorer.score([(s["system"], [{"role": "user", "content": s["prompt"]},
                                          {"role": "assistant", "content": s["response"]}]) for s in samples], stats)
    for s, sc in zip(samples, scores):
        s["scores"] = sc
        s["measures"] = sample_measures(sc, s["response"])


def baseline_methods(cfg: DictConfig) -> list[str]:
    methods = list(cfg.baselines.methods or [])
    unknown = [m for m in methods if m not in ("prompting", "activation")]
    if unknown:
        raise ConfigError(f"baselines.methods: unknown {unknown}; choose from prompting, activation")
    return methods


def baseline_samples(cfg: DictConfig, base: Optional[SteerableModel], attributes, levels, prompts,
                     options: dict) -> list[dict]:
    """`baselines.methods`: prompting and/or activation steering of the policy's base model on the same jobs."""
    methods = baseline_methods(cfg)
    if not methods:
        return []
    jobs = sweep_jobs(attributes, levels, prompts, int(cfg.baselines.n_samples))
    out = []
    if "prompting" in methods:
        texts = bl.check_instructions(OmegaConf.to_container(cfg.baselines.prompting.instructions, resolve=True),
                                      attributes, levels)
        out += answer(base, "prompting", jobs, {**options, "seed": options["seed"] + 1},
                      prompts_of=lambda j: bl.instructed(j[2], texts[j[0]][j[1]]))
    if "activation" in methods:
        act = cfg.baselines.activation
        coef = bl.check_coefficients(list(act.coefficients), levels)
        layer = bl.middle_layer(base.model) if act.layer is None else int(act.layer)
        vectors = bl.attribute_vectors(base, str(act.labeled), attributes, layer, max_per_side=int(act.max_per_side),
                                       max_length=int(act.max_length))
        specs = {(a, lev): vectors.spec(a, layer, coef[lev], str(act.positions)) for a in attributes for lev in levels}
        out += answer(base, "activation", jobs, {**options, "seed": options["seed"] + 2},
                      steering_of=lambda j: specs[(j[0], j[1])])
    return out


def conditioning_results(cfg: DictConfig, policy: SteerableModel, base: Optional[SteerableModel],
                         attributes) -> Optional[dict]:
    """Conditioning strength (steerlm.conditioning) of the policy and of its base model (the control) on the
    held-out labeled conversations in `conditioning.data`; None when that is null."""
    c = cfg.conditioning
    if c.data is None or int(c.n) <= 0:
        return None
    from ..conditioning import measure

    convs, _ = load_mixture([OmegaConf.to_container(d, resolve=True) for d in c.data], policy.schema)
    kw = dict(device=policy.device, n_max=int(c.n), max_length=int(c.max_length), n_boot=int(cfg.n_boot))
    levels = check_levels(list(c.levels), policy.schema)
    args = (policy.tokenizer, policy.format, policy.schema, convs, attributes, levels)
    ls = policy.level_steering  # the model as shipped: the string and, with it, the checkpoint's level steering
    out = {"policy": measure(policy.model, *args, **kw,
                             steering_of=None if ls is None else lambda a, v: ls.spec({a: v}))}
    if ls is not None:
        out["policy_string"] = measure(policy.model, *args, **kw)  # the attribute string alone
    if c.control:
        out["base"] = measure(base.model, policy.tokenizer, policy.format, policy.schema, convs, attributes, levels, **kw)
    return out


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
    n_samples = int(cfg.n_samples)
    options = OmegaConf.to_container(cfg.generation, resolve=True)
    spec = steering_spec(cfg, model)  # optional activation steering on top of every AC-SFT generation
    print(f"evaluate: {len(attributes)} attributes x {len(levels)} levels x {len(prompts)} prompts x {n_samples} "
          f"samples = {len(attributes) * len(levels) * len(prompts) * n_samples} AC-SFT generations on {model.device}; "
          f"baselines: {list(cfg.baselines.methods or []) or 'none'}", flush=True)

    # ===== generate: AC-SFT, then the baselines on the same prompts; rate everything in one call ==============
    jobs = sweep_jobs(attributes, levels, prompts, n_samples)
    ac_sft = dict(attributes_of=lambda j: {j[0]: j[1]}, steering_of=(lambda j: spec) if spec is not None else None)
    samples = answer(model, "ac_sft", jobs, options, **ac_sft)
    if model.level_steering is not None and cfg.get("string_only", True):
        # the checkpoint also steers by its vectors: the same sweep with the attribute string alone, to compare
        samples += answer(model, "ac_sft_string", jobs, {**options, "seed": options["seed"] + 3}, **ac_sft,
                          level_steering=False)
    # the policy's base model, loaded once: the baselines answer with it, and it is the conditioning control
    c = cfg.conditioning
    needs_base = baseline_methods(cfg) or (c.data is not None and int(c.n) > 0 and c.control)
    base = bl.base_model(model, str(model.card["base_model"])) if needs_base else None
    samples += baseline_samples(cfg, base, attributes, levels, prompts, options)
    score_stats = ScoreStats()
    measure_samples(samples, scorer, score_stats)

    # ===== statistics per method: steerability with intervals, side effects ===================================
    measures = [f"rm:{a}" for a in scorer.trained_attributes] + list(sweep.TEXT_COLUMNS)
    methods = {m: sweep.method_stats([s for s in samples if s["method"] == m], attributes, levels, measures,
                                     n_boot=int(cfg.n_boot), seed=int(cfg.seed))
               for m in dict.fromkeys(s["method"] for s in samples)}
    conditioning = conditioning_results(cfg, model, base, attributes)
    del base

    result = {
        "model": str(cfg.model.path), "rm": str(cfg.rm), "attributes": methods["ac_sft"]["attributes"], "levels": levels,
        "methods": methods, "conditioning": conditioning, "measures": measures,
        "steering": None if spec is None else spec.to_dict()[0],
        "level_steering": None if model.level_steering is None else model.level_steering.describe(),
        "n_prompts": len(prompts), "n_samples": n_samples, "defaults": model.defaults, "generation": options,
        "generation_stats": model.stats.to_dict(), "rm_scoring": score_stats.to_dict(),
        "peak_mem_mb": round(te.peak_memory_mb(model.device), 1), "device": str(model.device),
        "wall_time_s": round(time.time() - t_start, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    plot_steerability(methods, out_dir / "steerability.png")
    write_text_atomic(out_dir / "steerability.json", json.dumps(result, indent=2) + "\n")
    for m, res in methods.items():
        print(f"--- {m}\n{format_table(res['attributes'])}")
    print(f"side effects of AC-SFT (standardized slope per requested level [95% CI]):\n"
          f"{format_side_effects(methods['ac_sft']['side_effects'])}")
    if conditioning:
        print(format_conditioning(conditioning))
    g = result["generation_stats"]
    print(f"generated {g['generated_tokens']} tokens in {g['seconds']} s ({g['tokens_per_s']} tokens/s); RM scored "
          f"{score_stats.scored}/{score_stats.inputs} ({score_stats.truncated_left} truncated, {score_stats.skipped_over_length} "
          f"skipped); peak {result['peak_mem_mb']} MB; {result['wall_time_s']} s")
    print(f"written to {out_dir}/steerability.json, samples.jsonl, steerability.png", flush=True)
    return result
