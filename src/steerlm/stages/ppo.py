"""PPO stage: the stage-3 policy trained against the multi-attribute RM collapsed to one scalar reward.

Actor: the SFT model (merged) with a fresh LoRA adapter; the reference is the same model with the adapter
disabled, i.e. exactly the initial policy, so no second copy is held and KL = 0 before the first update. Critic: the stage-1 RM with its K-head, read per token through the reward
weights (NeMo-Aligner initialises its critic the same way). Reward: (w · RM(x, y) − μ) / σ. The math is
in `steerlm.ppo_math`. Rollouts are attribute-conditioned: prompts carry the policy's default attributes
(or `attributes=` overrides), SteerLM-style.

One PPO step: sample `rollout_batch` prompts -> generate -> score -> old / reference log-probs and values ->
per-token rewards with the KL penalty -> GAE -> `ppo_epochs` passes of clipped policy and value updates
over mini-batches.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..attributes import AttributeSchema, weights_vector
from ..checkpoint import save_hf_model
from ..data.packing import collate_padded
from ..engines import torch_engine as te
from ..errors import ConfigError
from ..logging import MetricLogger, print0
from ..models.policy import SFT_CARD, apply_lora, load_for_generation, read_card
from ..models.reward_model import load_reward_model, load_tokenizer
from ..ppo_math import (check_reward_heads, entropy, gae, policy_loss, scalar_reward, standardisation,
                        token_rewards, value_loss, whiten)
from ..scoring import RM_CARD, RewardScorer, ScoreStats
from . import evaluate as steer_eval
from .generate import SteerableModel
from .steerlm2_data import encode_response


def token_log_probs(model, input_ids, attention_mask, amp_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log p(token_t | tokens_<t) (0 at t = 0) and the (B, T, V) logits that predict token t."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    pad = torch.zeros_like(lp[:, :1])
    return torch.cat([pad, lp], 1), torch.cat([torch.zeros_like(logits[:, :1]), logits], 1)


def critic_values(critic, weights: torch.Tensor, input_ids, attention_mask, amp_dtype, device) -> torch.Tensor:
    """V_t: the value of the state before token t, read from the hidden state at t − 1 through w · head."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        hidden = critic.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    v = critic.score_pooled(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:2], -1) @ weights
    return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1)


def reward_weights(cfg, schema: AttributeSchema) -> list[float]:
    w = OmegaConf.to_container(cfg.reward.weights, resolve=True)
    try:
        return weights_vector(schema, w)
    except ValueError as e:
        raise ConfigError(f"reward.weights: {e}") from None


def reward_standardisation(cfg, schema: AttributeSchema, weights: torch.Tensor) -> tuple[float, float, str]:
    """μ, σ from the config, or computed from a labeled file's RM scores (stage-2 output)."""
    src = cfg.reward.standardize_from
    if not src:
        return float(cfg.reward.mean), float(cfg.reward.std), "config"
    rows = []
    with open(src) as fh:
        for line in fh:
            for t in json.loads(line)["turns"]:
                s = t.get("scores")
                if s and all(a in s for a, w in zip(schema.attributes, weights.tolist()) if w):
                    rows.append([s.get(a, 0.0) for a in schema.attributes])
    if len(rows) < 2:
        raise ConfigError(f"reward.standardize_from {src}: fewer than 2 turns with scores for every attribute")
    mean, std = standardisation(torch.tensor(rows), weights)
    return mean, std, f"{src} ({len(rows)} turns)"


def held_out_reward(policy: SteerableModel, scorer, prompts, weights, mean, std, cfg) -> float:
    outs = policy.generate(prompts, None, max_new_tokens=cfg.generation.max_new_tokens, do_sample=False,
                           batch_size=cfg.generation.batch_size, progress=False)
    scores = scorer.score([(p["system"], p["turns"] + [{"role": "assistant", "content": o["text"]}])
                           for p, o in zip(prompts, outs)])
    attrs = torch.tensor([[s.get(a, 0.0) for a in policy.schema.attributes] for s in scores if s is not None])
    return float(scalar_reward(attrs, weights, mean, std).mean())


def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and cfg.engine.device != "cpu" \
        else torch.device("cpu")
    amp = te.resolve_precision(cfg.engine.precision, device)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    card, schema = read_card(cfg.policy), AttributeSchema.load(cfg.policy)
    tokenizer = load_tokenizer(cfg.policy)

    # ===== config checks first (no model loaded yet), then models ==============================
    rm_card = json.loads((Path(cfg.rm) / RM_CARD).read_text()) if (Path(cfg.rm) / RM_CARD).exists() else None
    if rm_card is None:
        raise FileNotFoundError(f"{cfg.rm}: not a steerlm RM (no {RM_CARD}); train one with recipes/train_reward.py")
    schema.require_same(AttributeSchema.load(cfg.rm), what=f"policy {cfg.policy}", other_what=f"RM {cfg.rm}")
    w_list = reward_weights(cfg, schema)
    untrained = [a for a, w in zip(schema.attributes, w_list) if w and a not in rm_card["trained_attributes"]]
    if untrained:
        raise ConfigError(f"reward.weights puts weight on {untrained}, which the RM {cfg.rm} was not trained on "
                          f"(it measures {', '.join(rm_card['trained_attributes'])})")
    critic_tok = load_tokenizer(cfg.rm)
    if critic_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the critic (from RM {cfg.rm}) reads the policy's token ids: their tokenizers must match")
    actor = apply_lora(load_for_generation(str(cfg.policy), dtype=getattr(torch, cfg.dtype)),
                       OmegaConf.to_container(cfg.lora, resolve=True)).to(device)
    scorer = RewardScorer(cfg.rm, device=str(device), precision=cfg.precision, batch_tokens=cfg.rm_batch_tokens,
                          over_length="truncate_left")
    critic = load_reward_model(cfg.rm, schema, pad_token_id=tokenizer.pad_token_id, require_rm=True).to(device)
    check_reward_heads(critic.config.num_labels, schema, w_list)
    weights = torch.tensor(w_list, device=device)
    mean, std, std_src = reward_standardisation(cfg, schema, weights.cpu())
    print0(f"ppo: reward = (w . RM - {mean:.3f}) / {std:.3f} [{std_src}], w = {dict(zip(schema.attributes, w_list))}")

    specs = [OmegaConf.to_container(s, resolve=True) for s in cfg.prompts]
    all_prompts = steer_eval.load_prompts(specs, schema, int(cfg.n_prompts) + int(cfg.n_eval_prompts))
    prompts, eval_prompts = all_prompts[:int(cfg.n_prompts)], all_prompts[int(cfg.n_prompts):]
    if not prompts:
        raise ConfigError("ppo: no training prompts")
    gen = SteerableModel(actor, tokenizer, schema, card, device)
    attributes = OmegaConf.to_container(cfg.attributes, resolve=True) if cfg.attributes else None
    actor.eval()
    before = held_out_reward(gen, scorer, eval_prompts, weights.cpu(), mean, std, cfg) if eval_prompts else None

    actor_opt = te.build_optimizer([p for p in actor.parameters() if p.requires_grad], cfg.optim.actor_lr,
                                   cfg.optim.weight_decay, tuple(cfg.optim.betas))
    critic_opt = te.build_optimizer([p for p in critic.parameters() if p.requires_grad], cfg.optim.critic_lr,
                                    cfg.optim.weight_decay, tuple(cfg.optim.betas))
    logger = MetricLogger(run_dir, is_main=True, wandb_cfg=cfg.logging.wandb, config=OmegaConf.to_container(cfg, resolve=True))
    R, gen_opts = int(cfg.rollout_batch), OmegaConf.to_container(cfg.generation, resolve=True)
    stats, history = ScoreStats(), []

    # ===== PPO steps ==========================================================================
    for step in range(1, int(cfg.steps) + 1):
        t0 = time.time()
        batch_prompts = [prompts[((step - 1) * R + k) % len(prompts)] for k in range(R)]
        outs = gen.generate(batch_prompts, attributes, do_sample=True, progress=False,
                            **{**gen_opts, "seed": int(cfg.seed) + step})
        t_gen = time.time() - t0
        scores = scorer.score([(p["system"], p["turns"] + [{"role": "assistant", "content": o["text"]}])
                               for p, o in zip(batch_prompts, outs)], stats)
        keep = [k for k, s in enumerate(scores) if s is not None]
        if len(keep) < 2:
            raise ConfigError(f"ppo step {step}: the RM scored {len(keep)} of {R} responses")
        attrs = torch.tensor([[scores[k].get(a, 0.0) for a in schema.attributes] for k in keep])  # untrained: weight 0
        score = scalar_reward(attrs, weights.cpu(), mean, std).to(device)
        rows = [encode_response(gen.format, tokenizer, schema, {"system": batch_prompts[k]["system"],
                                                                  "turns": batch_prompts[k]["turns"],
                                                                  "attributes": outs[k]["attributes"]},
                                outs[k]["text"], conditioned=True) for k in keep]
        b = {k: v.to(device) for k, v in collate_padded(rows, tokenizer.pad_token_id).items()}
        mask = b["loss_mask"].float()
        with torch.no_grad():
            old_lp, _ = token_log_probs(actor, b["input_ids"], b["attention_mask"], amp, device)
            with actor.disable_adapter():
                ref_lp, _ = token_log_probs(actor, b["input_ids"], b["attention_mask"], amp, device)
            old_values = critic_values(critic, weights, b["input_ids"], b["attention_mask"], amp, device)
            rewards, kl = token_rewards(score, old_lp, ref_lp, mask, cfg.kl_coef, cfg.absolute_kl)
            adv, ret = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            adv = whiten(adv, mask)
        actor.train()
        mb = int(cfg.mini_batch)
        infos = []
        for _ in range(int(cfg.ppo_epochs)):
            for s0 in range(0, len(keep), mb):
                sl = slice(s0, s0 + mb)
                lp, logits = token_log_probs(actor, b["input_ids"][sl], b["attention_mask"][sl], amp, device)
                p_loss, p_info = policy_loss(lp, old_lp[sl], adv[sl], mask[sl], cfg.clip_eps)
                ent = entropy(logits, mask[sl])
                actor_opt.zero_grad(set_to_none=True)
                (p_loss - cfg.entropy_coef * ent).backward()
                torch.nn.utils.clip_grad_norm_([p for p in actor.parameters() if p.requires_grad], cfg.optim.max_grad_norm)
                actor_opt.step()
                v = critic_values(critic, weights, b["input_ids"][sl], b["attention_mask"][sl], amp, device)
                v_loss, v_info = value_loss(v, old_values[sl], ret[sl], mask[sl], cfg.value_clip)
                critic_opt.zero_grad(set_to_none=True)
                v_loss.backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.optim.max_grad_norm)
                critic_opt.step()
                infos.append({"policy_loss": float(p_loss.detach()), "value_loss": float(v_loss.detach()),
                              "entropy": float(ent.detach()), **p_info, **v_info})
        actor.eval()
        gen_tokens = sum(outs[k]["tokens"] for k in keep)
        metrics = {"ppo/reward_mean": float(score.mean()), "ppo/reward_std": float(score.std()),
                   "ppo/kl": float((kl * mask).sum(-1).mean()), "ppo/response_tokens": float(mask.sum(-1).mean()),
                   "ppo/generated_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
                   "ppo/step_seconds": time.time() - t0, "ppo/peak_mem_mb": te.peak_memory_mb(device),
                   **{f"ppo/{k}": sum(i[k] for i in infos) / len(infos) for k in infos[0]}}
        logger.log(metrics, step)
        history.append(metrics)

    after = held_out_reward(gen, scorer, eval_prompts, weights.cpu(), mean, std, cfg) if eval_prompts else None
    new_card = {**card, "lora": False, "ppo": {"from": str(cfg.policy), "steps": int(cfg.steps), "reward_weights": w_list}}
    merged = actor.merge_and_unload()  # the policy as a plain HF model (the adapter sat on the merged SFT model)
    save_hf_model(merged, {k: v.detach().cpu() for k, v in merged.state_dict().items()}, run_dir / "model",
                  tokenizer=tokenizer, schema=schema, extra_json={SFT_CARD: new_card})
    save_hf_model(critic.hf_model, {k: v.detach().cpu() for k, v in critic.hf_model.state_dict().items()},
                  run_dir / "critic", tokenizer=tokenizer, schema=schema)
    summary = {"steps": int(cfg.steps), "reward_weights": w_list, "standardisation": {"mean": mean, "std": std,
                                                                                       "from": std_src},
               "held_out_reward": {"before": before, "after": after, "prompts": len(eval_prompts)},
               "reward_curve": [h["ppo/reward_mean"] for h in history], "kl_curve": [h["ppo/kl"] for h in history],
               "generated_tokens_per_s": round(sum(h["ppo/generated_tokens_per_s"] for h in history) / len(history), 1),
               "rm_scoring": stats.to_dict(), "peak_mem_mb": round(te.peak_memory_mb(device), 1),
               "wall_time_s": round(time.time() - t_start, 1)}
    logger.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    print0(f"ppo: held-out reward {fmt(before)} -> {fmt(after)}; model -> {run_dir / 'model'}; {summary['wall_time_s']} s")
    return summary
