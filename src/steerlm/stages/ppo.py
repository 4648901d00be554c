"""PPO stage: the stage-3 policy trained against the multi-attribute RM collapsed to one scalar reward.

Actor: the SFT model (merged) with a fresh LoRA adapter; the reference is the same model with the
adapter disabled, i.e. exactly the initial policy, so no second copy is held and KL = 0 before the first
update. Critic: the stage-1 RM with its K-head read per token as (w · head − μ) / σ, the reward's own
scale (`ppo_setup.critic_values`). Reward: (w · RM(x, y) − μ) / σ. The math is in `steerlm.ppo_math`.
Rollouts are attribute-conditioned: prompts carry the policy's default attributes (or `attributes=`
overrides), SteerLM-style.

One PPO step: sample `rollout_batch` prompts -> generate -> score -> old / reference log-probs and values ->
per-token rewards with the KL penalty -> GAE -> `ppo_epochs` passes of clipped policy and value updates
over mini-batches.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..attributes import AttributeSchema
from ..checkpoint import save_hf_model, write_text_atomic
from ..data.packing import collate_padded
from ..engines import torch_engine as te
from ..errors import ConfigError
from ..logging import MetricLogger, print0
from ..losses import token_log_probs
from ..models.policy import SFT_CARD, apply_lora, load_for_generation, read_card
from ..models.reward_model import load_reward_model, load_tokenizer
from ..ppo_math import check_reward_heads, entropy, gae, policy_loss, token_rewards, value_loss, whiten
from ..scoring import RM_CARD, RewardScorer, ScoreStats
from ..steerable import SteerableModel
from .ppo_setup import (check_rm_measures, critic_values, held_out_reward, load_ppo_prompts, maybe_resume_ppo,
                        reward_standardisation, reward_weights, save_ppo_state, score_responses)


def policy_log_probs(actor, batch: dict, amp_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log π(y_t | ·) at response tokens (0 elsewhere), and the response tokens' (N, V) logits."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return token_log_probs(actor, batch)


def rollout_row(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[bool]]:
    """(ids, loss mask): the policy is trained on the response tokens it sampled, never on the prompt."""
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    ctx = setup(cfg)
    state = maybe_resume_ppo(cfg.resume, ctx.run_dir, ctx.actor, ctx.critic, ctx.actor_opt, ctx.critic_opt)
    ctx.actor.eval()
    if state is None:
        before = held_out_reward(ctx.gen, ctx.scorer, ctx.eval_prompts, ctx.attributes, ctx.weights, ctx.mean, ctx.std,
                                 cfg)
        state = {"step": 0, "held_out_before": before, "history": [], "rm_scoring": ScoreStats().to_dict()}
    ctx.stats = ScoreStats(**{k: v for k, v in state["rm_scoring"].items() if k in ScoreStats.__dataclass_fields__})
    history = state["history"]
    logger = MetricLogger(ctx.run_dir, is_main=True, wandb_cfg=cfg.logging.wandb,
                          config=OmegaConf.to_container(cfg, resolve=True))

    # ===== PPO steps ==========================================================================
    for step in range(state["step"] + 1, int(cfg.steps) + 1):
        t0 = time.time()
        roll = rollout(ctx, cfg, step)
        infos = update(ctx, cfg, step, roll)
        gen_tokens = sum(roll.outs[k]["tokens"] for k in roll.keep)
        step_s = time.time() - t0
        mask = roll.mask
        metrics = {"ppo/reward_mean": float(roll.score.mean()), "ppo/reward_std": float(roll.score.std()),
                   "ppo/kl": float((roll.kl * mask).sum(-1).mean()), "ppo/response_tokens": float(mask.sum(-1).mean()),
                   "ppo/generated_tokens_per_s": gen_tokens / max(roll.t_gen, 1e-9),
                   "ppo/train_tokens_per_s": int(roll.batch["attention_mask"].sum()) * int(cfg.ppo_epochs)
                   / max(step_s - roll.t_gen, 1e-9),
                   "ppo/step_seconds": step_s, "ppo/peak_mem_mb": te.peak_memory_mb(ctx.device),
                   **{f"ppo/{k}": sum(i[k] for i in infos) / len(infos) for k in infos[0]}}
        logger.log(metrics, step)
        history.append({"step": step, **metrics})
        if (int(cfg.save_every) > 0 and step % int(cfg.save_every) == 0) or step == int(cfg.steps):
            save_ppo_state(ctx.run_dir, step, ctx.actor, ctx.critic, ctx.actor_opt, ctx.critic_opt,
                           keep_last=int(cfg.keep_checkpoints),
                           state={"held_out_before": state["held_out_before"], "history": history,
                                  "rm_scoring": ctx.stats.to_dict()})
    logger.close()
    return export(ctx, cfg, state["held_out_before"], history, t_start)


@dataclass
class PPORun:
    """The models, optimizers and data of a PPO run, built once by `setup`."""
    run_dir: Path
    device: torch.device
    amp: object
    card: dict
    schema: AttributeSchema
    tokenizer: object
    w_list: list
    weights: torch.Tensor
    mean: float
    std: float
    std_src: str
    actor: object            # the SFT policy with a LoRA adapter (the adapter off = π_ref)
    critic: object           # V(s), initialised from the RM (None: critic=none)
    scorer: RewardScorer
    gen: SteerableModel
    attributes: Optional[dict]
    prompts: list
    eval_prompts: list
    prompt_counts: dict
    actor_opt: object
    critic_opt: object
    gen_opts: dict           # cfg.generation, resolved once
    stats: Optional[ScoreStats] = None


def setup(cfg: DictConfig) -> PPORun:
    """Config checks first (no model loaded yet), then the models, prompts and optimizers."""
    device = te.resolve_device(cfg.engine.device)
    amp = te.resolve_precision(cfg.engine.precision, device)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    card, schema = read_card(cfg.policy), AttributeSchema.load(cfg.policy)
    tokenizer = load_tokenizer(cfg.policy)
    if not (Path(cfg.rm) / RM_CARD).exists():
        raise FileNotFoundError(f"{cfg.rm}: not a steerlm RM (no {RM_CARD}); train one with steerlm train-reward")
    rm_card = json.loads((Path(cfg.rm) / RM_CARD).read_text())
    schema.require_same(AttributeSchema.load(cfg.rm), what=f"policy {cfg.policy}", other_what=f"RM {cfg.rm}")
    w_list = reward_weights(cfg, schema)
    check_rm_measures(w_list, schema, rm_card, str(cfg.rm))
    if load_tokenizer(cfg.rm).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the critic (from RM {cfg.rm}) reads the policy's token ids: their tokenizers must match")
    weights = torch.tensor(w_list, device=device)
    mean, std, std_src = reward_standardisation(cfg, schema, weights.cpu())
    actor = apply_lora(load_for_generation(str(cfg.policy), dtype=getattr(torch, cfg.dtype)),
                       OmegaConf.to_container(cfg.lora, resolve=True)).to(device)
    scorer = RewardScorer(cfg.rm, device=str(device), precision=cfg.precision, batch_tokens=cfg.rm_batch_tokens,
                          over_length="truncate_left")
    if cfg.critic not in ("rm", "none"):
        raise ConfigError(f"critic={cfg.critic!r}: choose rm (initialised from the RM) or none (V = 0)")
    from transformers import AutoConfig

    check_reward_heads(AutoConfig.from_pretrained(cfg.rm).num_labels, schema, w_list)
    critic = load_reward_model(cfg.rm, schema, pad_token_id=tokenizer.pad_token_id, require_rm=True).to(device) \
        if cfg.critic == "rm" else None
    print0(f"ppo: reward = (w . RM - {mean:.3f}) / {std:.3f} [{std_src}], w = {dict(zip(schema.attributes, w_list))}")
    gen = SteerableModel(actor, tokenizer, schema, card, device)
    attributes = OmegaConf.to_container(cfg.attributes, resolve=True) if cfg.attributes else None
    prompts, eval_prompts, prompt_counts = load_ppo_prompts(cfg, gen, attributes)
    actor_opt = te.build_optimizer([p for p in actor.parameters() if p.requires_grad], cfg.optim.actor_lr,
                                   cfg.optim.weight_decay, tuple(cfg.optim.betas))
    critic_opt = te.build_optimizer([p for p in critic.parameters() if p.requires_grad], cfg.optim.critic_lr,
                                    cfg.optim.weight_decay, tuple(cfg.optim.betas)) if critic is not None else None
    return PPORun(run_dir, device, amp, card, schema, tokenizer, w_list, weights, mean, std, std_src, actor, critic,
                  scorer, gen, attributes, prompts, eval_prompts, prompt_counts, actor_opt, critic_opt,
                  OmegaConf.to_container(cfg.generation, resolve=True))


@dataclass
class Rollout:
    outs: list
    keep: list
    score: torch.Tensor      # r(x, y) of the kept responses
    batch: dict              # prompt + response ids, masks
    mask: torch.Tensor       # response tokens
    old_lp: torch.Tensor     # log π_old(y_t)
    old_values: torch.Tensor
    kl: torch.Tensor
    adv: torch.Tensor        # whitened GAE advantages A_t
    ret: torch.Tensor        # returns R_t = A_t + V_old
    t_gen: float


def rollout(ctx: PPORun, cfg: DictConfig, step: int) -> Rollout:
    """Sample the step's prompts from π_old, score them with the frozen RM, and compute A_t, R_t (GAE)."""
    t0, R, device, amp = time.time(), int(cfg.rollout_batch), ctx.device, ctx.amp
    # 1. rollouts: the step's prompts (cycled), sampled from π_old with a per-step seed (resumable)
    batch_prompts = [ctx.prompts[((step - 1) * R + k) % len(ctx.prompts)] for k in range(R)]
    outs = ctx.gen.generate(batch_prompts, ctx.attributes, do_sample=True, progress=False,
                            **{**ctx.gen_opts, "seed": int(cfg.seed) + step})
    t_gen = time.time() - t0
    # 2. r(x, y) from the frozen RM
    keep, score = score_responses(ctx.scorer, batch_prompts, [o["text"] for o in outs], ctx.schema, ctx.weights,
                                  ctx.mean, ctx.std, ctx.stats)
    if len(keep) < 2:
        raise ConfigError(f"ppo step {step}: the RM scored {len(keep)} of {R} responses")
    score = score.to(device)
    # the exact sampled ids (the stop token included) after the exact prompt ids: re-tokenising the text
    # would score a different sequence than the one sampled and bias the KL estimate
    rows = [rollout_row(ctx.gen.prompt_ids(batch_prompts[k], outs[k]["attributes"]), outs[k]["ids"]) for k in keep]
    b = {k: v.to(device) for k, v in collate_padded(rows, ctx.tokenizer.pad_token_id).items()}
    mask = b["loss_mask"].float()
    # 3. log π_old, log π_ref (the adapter off), V_old -> per-token rewards -> GAE
    with torch.no_grad():
        old_lp, _ = policy_log_probs(ctx.actor, b, amp, device)
        with ctx.actor.disable_adapter():
            ref_lp, _ = policy_log_probs(ctx.actor, b, amp, device)
        old_values = critic_values(ctx.critic, ctx.weights, ctx.mean, ctx.std, b["input_ids"], b["attention_mask"],
                                   amp, device) if ctx.critic is not None \
            else torch.zeros_like(mask)  # no critic: A_t = whitened return (λ = 1)
        rewards, kl = token_rewards(score, old_lp, ref_lp, mask, cfg.kl_coef, cfg.absolute_kl)
        adv, ret = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask)
    return Rollout(outs, keep, score, b, mask, old_lp, old_values, kl, adv, ret, t_gen)


def update(ctx: PPORun, cfg: DictConfig, step: int, r: Rollout) -> list[dict]:
    """ppo_epochs passes of clipped policy and value updates over mini-batches (fixed order: resumable)."""
    actor, critic, device, amp, mb = ctx.actor, ctx.critic, ctx.device, ctx.amp, int(cfg.mini_batch)
    actor.train()
    infos = []
    for _ in range(int(cfg.ppo_epochs)):
        for s0 in range(0, len(r.keep), mb):
            sl = slice(s0, s0 + mb)
            part = {k: v[sl] for k, v in r.batch.items()}
            info = {}
            if critic is None or step > int(cfg.critic_warmup_steps):  # warm-up: the critic learns the returns first
                lp, logits = policy_log_probs(actor, part, amp, device)
                p_loss, p_info = policy_loss(lp, r.old_lp[sl], r.adv[sl], r.mask[sl], cfg.clip_eps)
                ent = entropy(logits, torch.ones(logits.shape[0], device=device))  # logits: response tokens only
                ctx.actor_opt.zero_grad(set_to_none=True)
                (p_loss - cfg.entropy_coef * ent).backward()
                torch.nn.utils.clip_grad_norm_([p for p in actor.parameters() if p.requires_grad], cfg.optim.max_grad_norm)
                ctx.actor_opt.step()
                info = {"policy_loss": float(p_loss.detach()), "entropy": float(ent.detach()), **p_info}
            if critic is not None:
                v = critic_values(critic, ctx.weights, ctx.mean, ctx.std, part["input_ids"], part["attention_mask"],
                                  amp, device)
                v_loss, v_info = value_loss(v, r.old_values[sl], r.ret[sl], r.mask[sl], cfg.value_clip)
                ctx.critic_opt.zero_grad(set_to_none=True)
                v_loss.backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.optim.max_grad_norm)
                ctx.critic_opt.step()
                info.update(value_loss=float(v_loss.detach()), **v_info)
            infos.append(info)
    actor.eval()
    return infos


def export(ctx: PPORun, cfg: DictConfig, before, history: list[dict], t_start: float) -> dict:
    """Held-out reward after, the HF-native policy (and critic), summary.json (written last: its presence = finished)."""
    run_dir = ctx.run_dir
    after = held_out_reward(ctx.gen, ctx.scorer, ctx.eval_prompts, ctx.attributes, ctx.weights, ctx.mean, ctx.std, cfg)
    new_card = {**ctx.card, "lora": False,
                "ppo": {"from": str(cfg.policy), "steps": int(cfg.steps), "reward_weights": ctx.w_list}}
    merged = ctx.actor.merge_and_unload()  # the policy as a plain HF model (the adapter sat on the merged SFT model)
    save_hf_model(merged, {k: v.detach().cpu() for k, v in merged.state_dict().items()}, run_dir / "model",
                  tokenizer=ctx.tokenizer, schema=ctx.schema, extra_json={SFT_CARD: new_card})
    if ctx.critic is not None:
        save_hf_model(ctx.critic.hf_model, {k: v.detach().cpu() for k, v in ctx.critic.hf_model.state_dict().items()},
                      run_dir / "critic", tokenizer=ctx.tokenizer, schema=ctx.schema)
    curve = lambda key: [h.get(key) for h in history]  # policy metrics are absent in critic warm-up steps
    summary = {"steps": int(cfg.steps), "reward_weights": ctx.w_list,
               "standardisation": {"mean": ctx.mean, "std": ctx.std, "from": ctx.std_src}, "prompts": ctx.prompt_counts,
               "held_out_reward": {"before": before, "after": after, "prompts": len(ctx.eval_prompts)},
               "reward_curve": curve("ppo/reward_mean"), "reward_std_curve": curve("ppo/reward_std"),
               "kl_curve": curve("ppo/kl"), "entropy_curve": curve("ppo/entropy"),
               "generated_tokens_per_s": round(sum(curve("ppo/generated_tokens_per_s")) / len(history), 1),
               "train_tokens_per_s": round(sum(curve("ppo/train_tokens_per_s")) / len(history), 1),
               "rm_scoring": ctx.stats.to_dict(), "peak_mem_mb": round(max(curve("ppo/peak_mem_mb")), 1),
               "wall_time_s": round(time.time() - t_start, 1)}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    print0(f"ppo: held-out reward {fmt(before)} -> {fmt(after)}; model -> {run_dir / 'model'}; {summary['wall_time_s']} s")
    return summary
