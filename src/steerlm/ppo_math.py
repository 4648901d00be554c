"""PPO from a multi-attribute reward model: the math (NeMo-Aligner `ppo_utils.py`, HelpSteer2 paper §4.4).

Reward. The stage-1 RM predicts K attributes a(x, y) ∈ R^K; PPO needs one scalar:

    r(x, y) = (w · a(x, y) − μ) / σ          w: attribute weights (e.g. NeMo-Aligner's 70B vector
                                             [0,0,0,0,0.65,0.8,0.45,0.55,-0.4] over steerlm9), μ, σ: the
                                             mean / std of w · a over labeled responses (standardisation)

Per-token rewards for a response of T tokens (the RM scalar lands on the last token):

    R_t = −β · KL_t + [t = T] · r(x, y),     KL_t = log π(y_t|·) − log π_ref(y_t|·)  (|·| with absolute_kl)

GAE (γ discount, λ trace) with values V_t from the critic:

    δ_t = R_t + γ V_{t+1} − V_t              (V_{T+1} = 0)
    Â_t = δ_t + γ λ Â_{t+1},  returns G_t = Â_t + V_t;  Â is whitened over the batch's response tokens

Losses over response tokens (ρ_t = π_θ / π_old):

    L_π = −mean( min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t) )
    L_V = ½ mean( max((V_θ − G)², (V_old + clip(V_θ − V_old, −ε_v, ε_v) − G)²) )
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attributes import AttributeSchema
from .errors import ConfigError


# ===== reward ====================================================================================
def check_reward_heads(n_heads: int, schema: AttributeSchema, weights: Sequence[float]) -> None:
    """A K-head RM needs K weights in its schema's order: a mismatch is an error, never a silent reshape."""
    if n_heads != len(schema):
        raise ConfigError(f"the RM has {n_heads} output heads but its schema {schema.name!r} has {len(schema)} "
                          f"attributes ({', '.join(schema.attributes)})")
    if len(weights) != n_heads:
        raise ConfigError(f"reward.weights has {len(weights)} entries for an RM with {n_heads} heads "
                          f"({', '.join(schema.attributes)})")


def scalar_reward(attributes: torch.Tensor, weights: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """(B, K) RM outputs -> (B,) standardised scalar rewards (w · a − μ) / σ."""
    if std <= 0:
        raise ConfigError(f"reward standardisation std must be > 0, got {std}")
    return (attributes.float() @ weights.float() - mean) / std


def standardisation(attributes: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """μ, σ of w · a over a set of rated responses (e.g. the stage-2 labels)."""
    r = attributes.float() @ weights.float()
    if r.numel() < 2:
        raise ConfigError("reward standardisation needs at least 2 rated responses")
    return float(r.mean()), float(r.std().clamp_min(1e-6))


# ===== per-token rewards, GAE ====================================================================
def token_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, absolute_kl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """score (B,), log-probs (B, T) of the sampled tokens, mask (B, T) = response token -> (rewards, kl), (B, T)."""
    kl = (logprobs - ref_logprobs) * mask
    if absolute_kl:
        kl = kl.abs()
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # the final response token of each row
    rewards = rewards + last.float() * score.unsqueeze(-1)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each row -> (advantages, returns), (B, T)."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # padding after the response leaves the recursion untouched
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    m = mask.to(x.dtype)
    n = m.sum().clamp_min(1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


# ===== losses ====================================================================================
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, dict]:
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = -masked_mean(torch.min(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
        approx_kl = masked_mean(old_logprobs - logprobs, mask)
    return loss, {"clip_fraction": float(clip_frac), "approx_kl": float(approx_kl)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        clip_frac = masked_mean(((values - old_values).abs() > clip).float(), mask)
    return loss, {"value_clip_fraction": float(clip_frac)}


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the policy over response positions."""
    logp = torch.log_softmax(logits.float(), -1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)
