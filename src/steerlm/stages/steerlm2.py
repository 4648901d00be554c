"""SteerLM 2.0 stage: sample from Q', score, weight, and train Q_θ with the listwise loss; iterate.

Per iteration k (Q' = the stage-3 model for k = 1, iteration k−1's result after that):
1. sample n responses per (prompt, target attributes) from Q' (`steerlm2_data.sample_groups`);
2. score them with the stage-1 RM -> log P(a|x,y) (Beta likelihood, `steerlm2_math`);
3. log P(y|x) under the reference model (no attribute string), log Q'(y|a,x) under the trainable policy
   before its first update, with the training forward's numerics, so b' is exactly uniform at step 1;
4. write the groups as NeMo-Aligner SteerLM2Dataset JSONL (`iter_k/samples.jsonl`);
5. train: per group, loss = −Σ sg(w' − b') log Q_θ(y_i) / L̄; log `distance` = KL(w' ‖ b');
6. save `iter_k/model` (same card as the SFT model: generation and evaluation read it unchanged).
A finished iteration is skipped on restart (its samples and model are on disk). The final policy is
`run_dir/model` (+ `merged/`), with the steerability before and after in `summary.json`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..attributes import AttributeSchema
from ..checkpoint import atomic_directory
from ..data.packing import collate_padded
from ..engines import torch_engine as te
from ..errors import ConfigError
from ..logging import MetricLogger
from ..models.policy import (SFT_CARD, load_causal_lm, load_trainable_policy, read_card, save_merged_policy,
                             save_policy)
from ..models.reward_model import load_tokenizer
from ..scoring import RewardScorer, ScoreStats
from ..sft_template import SFTFormat
from ..losses import sequence_log_probs
from ..steerlm2_math import listwise_loss, target_weights
from . import evaluate as steer_eval
from . import steerlm2_data as sd
from ..steering.levels import copy_level_steering
from ..steerable import SteerableModel


def group_batch(group: dict, fmt, tokenizer, schema, device) -> dict:
    seqs = [sd.encode_response(fmt, tokenizer, schema, group, r["text"], conditioned=True) for r in group["responses"]]
    return {k: v.to(device) for k, v in collate_padded(seqs, tokenizer.pad_token_id).items()}


def policy_log_probs(model, batch, amp_dtype, device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return sequence_log_probs(model, batch)


def build_groups(cfg, policy_path: str, schema: AttributeSchema, device, stats: dict) -> list[dict]:
    """Steps 1–3 except log Q' (filled by the trainer)."""
    policy = SteerableModel.load(policy_path, str(device), cfg.precision)
    specs = [OmegaConf.to_container(s, resolve=True) for s in cfg.prompts]
    prompts = steer_eval.load_prompts(specs, schema, int(cfg.n_prompts))
    targets = OmegaConf.to_container(cfg.targets, resolve=True) or []
    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    t0 = time.time()
    groups = sd.sample_groups(policy, prompts, targets, int(cfg.n_samples), gen)
    stats["sampling"] = {**policy.stats.to_dict(), "seconds": round(time.time() - t0, 1)}
    fmt, tokenizer = policy.format, policy.tokenizer
    del policy
    scorer = RewardScorer(cfg.rm, device=str(device), precision=cfg.precision, batch_tokens=cfg.rm_batch_tokens,
                          over_length="truncate_left")
    schema.require_same(scorer.schema, what=f"policy {policy_path}", other_what=f"RM {cfg.rm}")
    likelihood = cfg.likelihood.attributes or [a for a in groups[0]["attributes"] if a in scorer.trained_attributes]
    missing = [a for a in likelihood if a not in scorer.trained_attributes]
    if missing:
        raise ConfigError(f"likelihood.attributes {missing}: the RM {cfg.rm} was not trained on them")
    score_stats = ScoreStats()
    stats["dropped"] = sd.score_groups(groups, scorer, schema, likelihood, concentration=cfg.likelihood.concentration,
                                       bins=cfg.likelihood.bins, stats=score_stats)
    stats["rm_scoring"] = score_stats.to_dict()
    stats["likelihood_attributes"] = list(likelihood)
    del scorer
    ref_path = cfg.reference or read_card(policy_path)["base_model"]
    reference = load_causal_lm(ref_path).to(device).eval()
    amp = te.resolve_precision(cfg.engine.precision, device)
    stats["reference_log_probs"] = sd.fill_log_probs(groups, reference, tokenizer, fmt, schema, "log_p_y",
                                                     conditioned=False, device=device,
                                                     batch_tokens=cfg.logprob_batch_tokens, amp_dtype=amp)
    return groups


def train_iteration(model, groups: list[dict], cfg, fmt, tokenizer, schema, device, logger, step: int,
                    it: int) -> tuple[int, dict]:
    """Fill log Q' (if unset) with the untrained policy, then the listwise updates.

    -> (step, {distance: per step, tokens: trained (non-pad) tokens, seconds})."""
    amp = te.resolve_precision(cfg.engine.precision, device)
    model.eval()  # no dropout: log Q' below and log Q_θ in training are the same function at θ = Q'
    if any(r.get("log_q_prime") is None for g in groups for r in g["responses"]):
        t0 = time.time()
        with torch.no_grad():
            for g in groups:
                lq = policy_log_probs(model, group_batch(g, fmt, tokenizer, schema, device), amp, device)
                for r, v in zip(g["responses"], lq.tolist()):
                    r["log_q_prime"] = v
        logger.log({"steerlm2/log_q_prime_seconds": time.time() - t0}, step, echo=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = te.build_optimizer(params, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas))
    per_step = int(cfg.train.groups_per_step)
    rng = random.Random(cfg.seed + it)
    history, total_tokens, t_train = [], 0, time.time()
    for epoch in range(int(cfg.train.epochs)):
        order = list(range(len(groups)))
        rng.shuffle(order)
        for start in range(0, len(order), per_step):
            chunk = [groups[i] for i in order[start:start + per_step]]
            t0, tokens, losses, distances = time.time(), 0, [], []
            optimizer.zero_grad(set_to_none=True)
            for g in chunk:
                batch = group_batch(g, fmt, tokenizer, schema, device)
                lq = policy_log_probs(model, batch, amp, device)
                resp = g["responses"]
                tensor = lambda key: torch.tensor([r[key] for r in resp], dtype=torch.float32, device=device)
                w = target_weights(tensor("log_p_a"), tensor("log_p_y"), tensor("log_q_prime"))
                loss, info = listwise_loss(lq, w, tensor("log_q_prime"), batch["loss_mask"].sum(-1))
                (loss / len(chunk)).backward()
                losses.append(float(loss.detach()))
                distances.append(info["distance"])
                tokens += int(batch["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm) if cfg.optim.max_grad_norm else None
            optimizer.step()
            step += 1
            dt = time.time() - t0
            history.append(sum(distances) / len(distances))
            total_tokens += tokens
            logger.log({"steerlm2/loss": sum(losses) / len(losses), "steerlm2/distance": sum(distances) / len(distances),
                        "steerlm2/grad_norm": None if grad_norm is None else float(grad_norm),
                        "steerlm2/tokens_per_s": tokens / max(dt, 1e-9), "steerlm2/iteration": it,
                        "steerlm2/epoch": epoch, "steerlm2/peak_mem_mb": te.peak_memory_mb(device)}, step)
    return step, {"distance": history, "tokens": total_tokens, "seconds": time.time() - t_train}


def steerability(cfg, model_path: str, out_dir: Path) -> dict:
    """The stage-3 steerability evaluation (recipes/evaluate.py) on `model_path` with `cfg.eval` settings."""
    ev = OmegaConf.create({**OmegaConf.to_container(cfg.eval, resolve=True), "model": {"path": model_path},
                           "rm": cfg.rm, "output_dir": str(out_dir), "device": "auto", "precision": cfg.precision})
    ev.pop("enabled")
    ev.pop("before")
    return steer_eval.run(ev)


def compare_steerability(before: dict, after: dict) -> dict:
    """Per attribute: Spearman(requested, RM-measured) and (requested, tokens) with their intervals and verdicts,
    and the conditioning strength, before and after SteerLM 2.0."""
    def cond(res, a):
        c = ((res.get("conditioning") or {}).get("policy") or {}).get("attributes", {}).get(a) or {}
        return c.get("strength")

    out = {}
    for a, m in after["attributes"].items():
        b = before["attributes"].get(a, {})
        out[a] = {"before": b.get("spearman"), "after": m["spearman"],
                  "length_before": b.get("length_spearman"), "length_after": m["length_spearman"],
                  "before_ci": b.get("rm_ci"), "after_ci": m.get("rm_ci"),
                  "length_before_ci": b.get("length_ci"), "length_after_ci": m.get("length_ci"),
                  "verdict_before": b.get("verdict"), "verdict_after": m.get("verdict"),
                  "conditioning_before": cond(before, a), "conditioning_after": cond(after, a)}
    return out


def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    device = te.resolve_device(cfg.engine.device)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    card = read_card(cfg.policy)
    schema = AttributeSchema.load(cfg.policy)
    fmt = SFTFormat.from_dict(card["format"])
    logger = MetricLogger(run_dir, is_main=True, wandb_cfg=cfg.logging.wandb, config=OmegaConf.to_container(cfg, resolve=True))
    policy_path, step, iterations = str(cfg.policy), 0, []
    for it in range(1, int(cfg.iterations) + 1):
        it_dir = run_dir / f"iter_{it}"
        if (it_dir / "model" / SFT_CARD).exists():
            print(f"steerlm2: iteration {it} already done ({it_dir / 'model'})", flush=True)
            iterations.append(json.loads((it_dir / "stats.json").read_text()))
            policy_path = str(it_dir / "model")
            continue
        it_dir.mkdir(parents=True, exist_ok=True)
        stats: dict = {"iteration": it, "policy": policy_path}
        samples = it_dir / "samples.jsonl"
        if it == 1 and cfg.data_file:
            groups = sd.read_groups(cfg.data_file, schema)
            stats["data_file"] = str(cfg.data_file)
        elif samples.exists():
            groups = sd.read_groups(samples, schema)
        else:
            groups = build_groups(cfg, policy_path, schema, device, stats)
            for g in groups:
                for r in g["responses"]:
                    r["log_q_prime"] = None
        if not groups:
            raise ConfigError(f"steerlm2 iteration {it}: no group kept (see dropped counts: {stats.get('dropped')})")
        print(f"steerlm2: iteration {it}: {sd.group_summary(groups)} from {policy_path}", flush=True)
        te.reset_peak_memory(device)
        model, lora = load_trainable_policy(policy_path, getattr(torch, cfg.dtype))
        model.to(device)
        tokenizer = load_tokenizer(policy_path)
        step0, t0 = step, time.time()
        step, trained = train_iteration(model, groups, cfg, fmt, tokenizer, schema, device, logger, step, it)
        if not samples.exists():
            sd.write_groups(samples, groups, schema)
        stats.update(groups=sd.group_summary(groups), steps=step - step0, train_seconds=round(time.time() - t0, 1),
                     distance=trained["distance"], train_tokens=trained["tokens"],
                     train_tokens_per_s=round(trained["tokens"] / max(trained["seconds"], 1e-9), 1),
                     peak_mem_mb=round(te.peak_memory_mb(device), 1))
        new_card = {**card, "steerlm2": {"iteration": it, "from": policy_path}}
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_policy(it_dir / "model", hf_model=model, state=state, tokenizer=tokenizer, schema=schema, card=new_card,
                    lora=lora, base_path=card["base_model"], save_merged=False, dtype=getattr(torch, cfg.dtype))
        (it_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        iterations.append(stats)
        policy_path = str(it_dir / "model")
        del model

    # the final policy, HF-native like the SFT output: model/ (+ merged/ for a LoRA policy)
    final = run_dir / "model"
    with atomic_directory(final) as tmp:
        shutil.copytree(policy_path, tmp, dirs_exist_ok=True)
        # the SFT policy's level steering (sft.level_steering) goes with it: before and after steer alike
        copy_level_steering(str(cfg.policy), tmp)
    if (final / "adapter_config.json").exists():
        merged = save_merged_policy(final, tokenizer=load_tokenizer(str(final)), schema=schema,
                                    card=read_card(str(final)), dtype=getattr(torch, cfg.dtype))
        copy_level_steering(final, merged)

    result = {"iterations": iterations, "steps": sum(it["steps"] for it in iterations), "policy_in": str(cfg.policy),
              "model": str(final),
              "wall_time_s": None}
    if cfg.eval.enabled:
        before = json.loads(Path(cfg.eval.before).read_text()) if cfg.eval.before else \
            steerability(cfg, str(cfg.policy), run_dir / "eval_before")
        after = steerability(cfg, str(final), run_dir / "eval_after")
        result["steerability"] = compare_steerability(before, after)
    result["wall_time_s"] = round(time.time() - t_start, 1)
    logger.close()
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"steerlm2: {result['steps']} steps over {len(iterations)} iteration(s); model -> {final}; {result['wall_time_s']} s",
          flush=True)
    return result
