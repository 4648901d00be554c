"""What the PPO stage trains against, and its resumable state: the scalar reward, the critic's values, the
prompts, the held-out reward, and the checkpoint of actor adapter + critic + both optimizers.

The loop itself is `steerlm.stages.ppo`; the math is `steerlm.ppo_math`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from .. import checkpoint as ckpt
from ..attributes import AttributeSchema, weights_vector
from ..errors import ConfigError
from ..logging import print0
from ..ppo_math import scalar_reward, standardisation
from ..scoring import ScoreStats
from . import evaluate as steer_eval
from ..steerable import SteerableModel


# ===== reward: (w · RM(x, y) − μ) / σ =============================================================
def reward_weights(cfg, schema: AttributeSchema) -> list[float]:
    w = OmegaConf.to_container(cfg.reward.weights, resolve=True)
    try:
        return weights_vector(schema, w)
    except ValueError as e:
        raise ConfigError(f"reward.weights: {e}") from None


def check_rm_measures(weights: list[float], schema: AttributeSchema, rm_card: dict, rm_path: str) -> None:
    """Weight on an attribute the RM never learnt would reward its untrained head's noise."""
    untrained = [a for a, w in zip(schema.attributes, weights) if w and a not in rm_card["trained_attributes"]]
    if untrained:
        raise ConfigError(f"reward.weights puts weight on {untrained}, which the RM {rm_path} was not trained on "
                          f"(it measures {', '.join(rm_card['trained_attributes'])})")


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
        raise ConfigError(f"reward.standardize_from {src}: fewer than 2 turns with scores for every weighted attribute")
    mean, std = standardisation(torch.tensor(rows), weights)
    return mean, std, f"{src} ({len(rows)} turns)"


def score_responses(scorer, prompts: list[dict], texts: list[str], schema: AttributeSchema, weights: torch.Tensor,
                    mean: float, std: float, stats: Optional[ScoreStats] = None) -> tuple[list[int], torch.Tensor]:
    """RM-score (prompt, response) pairs -> (indices the RM scored, their scalar rewards)."""
    scores = scorer.score([(p["system"], p["turns"] + [{"role": "assistant", "content": t}])
                           for p, t in zip(prompts, texts)], stats)
    keep = [k for k, s in enumerate(scores) if s is not None]
    # an attribute the RM was not trained on has weight 0 (check_rm_measures), so its 0.0 here is inert
    attrs = torch.tensor([[scores[k].get(a, 0.0) for a in schema.attributes] for k in keep]).reshape(len(keep), len(schema))
    return keep, scalar_reward(attrs, weights.cpu(), mean, std)


def held_out_reward(policy: SteerableModel, scorer, prompts, attributes, weights, mean, std, cfg) -> Optional[float]:
    """Mean reward of greedy responses to prompts PPO never trains on."""
    if not prompts:
        return None
    outs = policy.generate(prompts, attributes, max_new_tokens=cfg.generation.max_new_tokens, do_sample=False,
                           batch_size=cfg.generation.batch_size, progress=False)
    _, r = score_responses(scorer, prompts, [o["text"] for o in outs], policy.schema, weights, mean, std)
    return float(r.mean()) if len(r) else None


# ===== critic: V_t = w · head(h_{t−1}) =============================================================
def critic_values(critic, weights: torch.Tensor, mean: float, std: float, input_ids, attention_mask, amp_dtype,
                  device) -> torch.Tensor:
    """V_t, the value of the state before token t, read from the hidden state at t − 1 as (w · head − μ) / σ.

    The RM's K-head turned into a value head on the reward's own scale: at initialisation the critic
    is the RM, so V at the last token is the RM's r(x, y) and V_t is the RM's reward for the response
    so far (NeMo-Aligner also initialises its critic from the RM). Without the standardisation V
    starts at w · RM ≈ μ while returns are ≈ 0, and the clipped value loss needs many steps to close a
    gap of μ / σ: until then GAE's baseline is wrong by that much and the advantages carry no signal."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        hidden = critic.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    v = (critic.score_pooled(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:2], -1) @ weights - mean) / std
    return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1)


# ===== prompts ===================================================================================
def load_ppo_prompts(cfg, policy: SteerableModel, attributes) -> tuple[list[dict], list[dict], dict]:
    """Training and held-out prompts, each at most `max_prompt_tokens` long (templated, attributes
    included) -> (train, held_out, counts). Longer prompts are skipped and counted, never cut."""
    specs = [OmegaConf.to_container(s, resolve=True) for s in cfg.prompts]
    n_train, n_eval, limit = int(cfg.n_prompts), int(cfg.n_eval_prompts), cfg.max_prompt_tokens
    prompts, too_long = [], 0
    for p in steer_eval.load_prompts(specs, policy.schema, 10 ** 9):
        if limit and len(policy.prompt_ids(p, attributes)) > int(limit):
            too_long += 1
            continue
        prompts.append(p)
        if len(prompts) == n_train + n_eval:
            break
    train, held_out = prompts[:n_train], prompts[n_train:]
    if not train:
        raise ConfigError(f"ppo: no training prompt within max_prompt_tokens={limit} in "
                          f"{', '.join(str(s.get('path')) for s in specs)}")
    counts = {"train": len(train), "held_out": len(held_out), "skipped_over_max_prompt_tokens": too_long}
    if len(held_out) < n_eval:
        print0(f"ppo: only {len(held_out)} of n_eval_prompts={n_eval} held-out prompts left after {len(train)} "
               f"training prompts ({too_long} longer than max_prompt_tokens skipped)")
    return train, held_out, counts


# ===== resumable state ===========================================================================
def save_ppo_state(run_dir: Path, step: int, actor, critic, actor_opt, critic_opt, state: dict, keep_last: int) -> None:
    """Actor adapter + critic weights (safetensors), both optimizers + RNG, and the run's history so far."""
    trainable = {n for n, p in actor.named_parameters() if p.requires_grad}
    model_state = {f"actor.{k}": v for k, v in actor.state_dict().items() if k in trainable}
    if critic is not None:
        model_state.update({f"critic.{k}": v for k, v in critic.state_dict().items()})
    optimizer_state = {"actor": actor_opt.state_dict(), **({"critic": critic_opt.state_dict()} if critic else {})}
    ckpt.save_training_state(run_dir, step, model_state=model_state, keep_last=keep_last, state=state,
                             optimizer_state=optimizer_state)


def maybe_resume_ppo(resume, run_dir: Path, actor, critic, actor_opt, critic_opt) -> Optional[dict]:
    """`resume`: auto (the latest checkpoint, if any) | never | a checkpoint dir -> its state, or None."""
    path = ckpt.find_latest_checkpoint(run_dir) if resume == "auto" else (
        None if resume in (None, "never") else Path(resume))
    if path is None:
        return None
    model_state, optim_state, state = ckpt.load_training_state(path)
    actor_state = {k[len("actor."):]: v for k, v in model_state.items() if k.startswith("actor.")}
    trainable = {n: tuple(p.shape) for n, p in actor.named_parameters() if p.requires_grad}
    if {k: tuple(v.shape) for k, v in actor_state.items()} != trainable:
        raise ConfigError(f"{path}: its actor adapter does not match this config's LoRA (names or shapes differ); "
                          f"resume=never starts over")
    actor.load_state_dict(actor_state, strict=False)
    if (critic is None) != ("critic" not in optim_state):
        raise ConfigError(f"{path}: saved {'with' if 'critic' in optim_state else 'without'} a critic, but this config "
                          f"has critic={'none' if critic is None else 'rm'}; resume=never starts over")
    actor_opt.load_state_dict(optim_state["actor"])
    if critic is not None:
        critic.load_state_dict({k[len("critic."):]: v for k, v in model_state.items() if k.startswith("critic.")})
        critic_opt.load_state_dict(optim_state["critic"])
    print0(f"ppo: resumed from {path} at step {state['step']}")
    return state
