"""One table: AC-SFT attributes vs activation steering vs both, on the same prompts, with their utility cost.

For one attribute a, each method sweeps one knob x over the same prompts (greedy):

- `ac_sft`:     the requested level l of a in the prompt (other attributes at the card's defaults);
- `activation`: the coefficient c of a's steering vector at one layer, h ← h + c · v_a (attributes at defaults);
- `both`:       level l_k together with coefficient c_k (the two lists paired by index; x = l_k).

The stage-1 RM rates every response. Per method: Spearman(x, RM-measured a), Spearman(x, length in
tokens), means per point (`steerlm.stages.evaluate.steerability_report`), and utility: the perplexity of
held-out reference responses, teacher-forced under the same setting, next to the unsteered model's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import write_text_atomic
from ..data.packing import collate_padded
from ..data.sources import load_mixture
from ..engines import torch_engine as te
from ..errors import ConfigError
from ..losses import token_log_probs
from ..report_render import plot_panels
from ..scoring import RewardScorer, ScoreStats
from ..steering import steer
from ..steering.vectors import AttributeVectors
from . import evaluate as ev
from ..steerable import SteerableModel
from .steerlm2_data import encode_response

METHODS = ("ac_sft", "activation", "both")


def settings(method: str, attribute: str, levels: list, coefficients: list) -> list[tuple[float, dict, float]]:
    """[(x, attribute overrides, steering coefficient)] for one method's sweep."""
    if method == "ac_sft":
        return [(lev, {attribute: lev}, 0.0) for lev in levels]
    if method == "activation":
        return [(c, {}, c) for c in coefficients]
    if method == "both":
        if len(levels) != len(coefficients):
            raise ConfigError(f"method both pairs levels and coefficients by index: {len(levels)} levels, "
                              f"{len(coefficients)} coefficients")
        return [(lev, {attribute: lev}, c) for lev, c in zip(levels, coefficients)]
    raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def load_references(specs, policy: SteerableModel, n: int, max_length: int) -> tuple[list[dict], int]:
    """Conversations whose last turn is an assistant response: the utility set. Over-length ones skipped, counted."""
    conversations, _ = load_mixture(specs, policy.schema)
    refs, too_long = [], 0
    for c in conversations:
        turns = c["turns"]
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            continue
        ref = {"system": c["system"], "turns": [{"role": t["role"], "content": t["content"]} for t in turns[:-1]],
               "response": turns[-1]["content"]}
        ids, _ = encode_response(policy.format, policy.tokenizer, policy.schema, {**ref, "attributes": policy.defaults},
                                 ref["response"], conditioned=True)
        if len(ids) > max_length:
            too_long += 1
            continue
        refs.append(ref)
        if len(refs) == n:
            break
    return refs, too_long


@torch.inference_mode()
def perplexity(policy: SteerableModel, refs: list[dict], overrides: dict, spec, batch_size: int) -> float:
    """exp(mean NLL per response token) of the references, with `overrides` in the prompt and `spec` applied."""
    attrs = policy.resolve_attributes(overrides)
    rows = [encode_response(policy.format, policy.tokenizer, policy.schema, {**r, "attributes": attrs}, r["response"],
                            conditioned=True) for r in refs]
    nll, n = 0.0, 0
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        b = {k: v.to(policy.device) for k, v in collate_padded(part, policy.tokenizer.pad_token_id).items()}
        starts = [m.index(True) for _, m in part]  # "generated" steering = the response tokens
        with steer(policy.model, spec, batch_size=len(part), prompt_lengths=starts):
            lp, _ = token_log_probs(policy.model, b)
        nll -= float(lp.sum())
        n += int(b["loss_mask"][:, 1:].sum())
    return math.exp(nll / max(n, 1))


def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    out_dir = Path(cfg.output_dir)
    policy = SteerableModel.load(str(cfg.policy), cfg.device, cfg.precision)
    scorer = RewardScorer(cfg.rm, device=str(policy.device), precision=cfg.precision, over_length="truncate_left")
    a = str(cfg.attribute)
    methods = list(cfg.methods)
    levels = ev.check_levels(list(cfg.levels), policy.schema)
    coefficients = [float(c) for c in cfg.coefficients]
    if "ac_sft" in methods or "both" in methods:
        ev.choose_attributes([a], policy.steerable, scorer.trained_attributes)
    elif a not in scorer.trained_attributes:
        raise ConfigError(f"the RM {cfg.rm} was not trained on {a!r}: it cannot measure the steering")
    vectors = AttributeVectors.load(cfg.vectors)
    n_layers = len(te.decoder_layers(policy.model))
    layer = n_layers // 2 if cfg.layer is None else int(cfg.layer)
    plan = {m: settings(m, a, levels, coefficients) for m in methods}
    spec_of = lambda c: vectors.spec(a, layer, c, str(cfg.positions))
    prompts = ev.load_prompts([OmegaConf.to_container(s, resolve=True) for s in cfg.prompts], policy.schema,
                              int(cfg.n_prompts))

    # ===== generate every (method, x, prompt) in one batched call; rate all responses in one call ===
    jobs = [(m, x, o, c, p) for m in methods for x, o, c in plan[m] for p in prompts]
    print(f"compare_steering: {a}, layer {layer}/{n_layers}, {len(jobs)} generations", flush=True)
    outs = policy.generate([p for *_, p in jobs], [o for _, _, o, _, _ in jobs],
                           steering=[spec_of(c) for _, _, _, c, _ in jobs],
                           **OmegaConf.to_container(cfg.generation, resolve=True))
    stats = ScoreStats()
    scores = scorer.score([(p["system"], p["turns"] + [{"role": "assistant", "content": o["text"]}])
                           for (*_, p), o in zip(jobs, outs)], stats)
    samples = [{"method": m, "attribute": a, "level": x, "coefficient": c, "prompt_id": p["id"],
                "prompt": p["turns"][-1]["content"], "response": o["text"], "tokens": o["tokens"], "stopped": o["stopped"],
                "scores": s} for (m, x, _, c, p), o, s in zip(jobs, outs, scores)]

    # ===== utility: reference perplexity under each setting ========================================
    refs, too_long = load_references([OmegaConf.to_container(s, resolve=True) for s in cfg.utility.references], policy,
                                     int(cfg.utility.n_references), int(cfg.utility.max_length))
    bs = int(cfg.utility.batch_size)
    base_ppl = perplexity(policy, refs, {}, None, bs) if refs else None
    table = {}
    for m in methods:
        xs = [x for x, _, _ in plan[m]]
        rep = ev.steerability_report([s for s in samples if s["method"] == m], [a], xs)[a]
        rep["perplexity"] = [perplexity(policy, refs, o, spec_of(c), bs) if refs else None for _, o, c in plan[m]]
        rep["coefficients"] = [c for _, _, c in plan[m]]
        table[m] = rep
    result = {"model": str(cfg.policy), "rm": str(cfg.rm), "vectors": str(cfg.vectors), "attribute": a, "layer": layer,
              "positions": str(cfg.positions), "n_prompts": len(prompts), "methods": table,
              "utility": {"references": len(refs), "skipped_over_max_length": too_long, "unsteered_perplexity": base_ppl},
              "generation_stats": policy.stats.to_dict(), "rm_scoring": stats.to_dict(),
              "peak_mem_mb": round(te.peak_memory_mb(policy.device), 1), "wall_time_s": round(time.time() - t_start, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    plot_panels({f"{m}: length (tokens)": list(zip(range(len(r["levels"])), r["length_mean"])) for m, r in table.items()},
                out_dir / "compare.png", f"{a}: response length per sweep point", xlabel="sweep point")
    write_text_atomic(out_dir / "compare.json", json.dumps(result, indent=2) + "\n")
    print(format_compare(result))
    return result


def format_compare(result: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = [f"{'method':<11} {'spearman(x, RM ' + result['attribute'] + ')':>26} {'spearman(x, length)':>20} "
             f"{'max perplexity':>14}  mean length per point",
             "-" * 100]
    for m, r in result["methods"].items():
        ppl = [p for p in r["perplexity"] if p is not None]
        lines.append(f"{m:<11} {f(r['spearman']):>26} {f(r['length_spearman']):>20} {f(max(ppl) if ppl else None):>14}  "
                     + " ".join("n/a" if v is None else str(round(v)) for v in r["length_mean"]))
    u = result["utility"]
    lines.append(f"unsteered perplexity of {u['references']} reference responses: {f(u['unsteered_perplexity'])} "
                 f"({u['skipped_over_max_length']} over max_length skipped)")
    return "\n".join(lines)
