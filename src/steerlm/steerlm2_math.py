"""SteerLM 2.0: the math (HelpSteer2 paper §4.5; NeMo-Aligner `GPTSteerLMModel`), next to the code.

Target policy, by Bayes' rule from an attribute model and an unconditioned LM:

    P(y | a, x)  ∝  P(a | x, y) · P(y | x)

Learn Q_θ(y | a, x), initialised from the stage-3 model Q', by minimising E_{a,x} KL(P(·|a,x) ‖ Q_θ(·|a,x)).
P cannot be sampled, so n responses y_1..y_n ~ Q'(·|a,x) are importance-weighted:

    w'_i = softmax_i( log P(a|x,y_i) + log P(y_i|x) − log Q'(y_i|a,x) )      self-normalised target weights
    b'_i = softmax_i( log Q_θ(y_i|a,x) − log Q'(y_i|a,x) )                     baseline (no gradient)
    ∇_θ L ≈ −Σ_i (w'_i − b'_i) ∇_θ log Q_θ(y_i|a,x)

At θ = Q' the baseline is uniform (1/n); Σ_i (w'_i − b'_i) = 0, so the update is contrastive. The loss below
has exactly that gradient, divided (as NeMo-Aligner does) by L̄, the mean response length of the group:

    loss = −Σ_i sg(w'_i − b'_i) · log Q_θ(y_i|a,x) / L̄          (sg: stop-gradient)
    distance = KL(w' ‖ b') = Σ_i w'_i (log w'_i − log b'_i)       (logged; → 0 as Q_θ reaches the target)

Attribute likelihood from a regression RM (paper §4.5; not in NeMo-Aligner): per attribute, the RM output r
on [lo, hi] becomes a Beta distribution with mean r_s = (r − lo)/(hi − lo) and concentration κ = 24
(α = κ·r_s, β = κ − α). The probability of level n is its Beta mass over n's bin:

    P(a = n | x, y) = F_Beta(u_n; α, β) − F_Beta(l_n; α, β)

bins="round": [n − ½, n + ½] on the scale (clipped to [lo, hi]), i.e. the levels an RM output rounds to;
bins="equal": the unit interval cut into (hi − lo + 1) equal bins. Either way the masses over all levels sum
to 1. log P(a | x, y) is the sum over the requested attributes (independence, as in the paper).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from scipy.special import betainc

from .attributes import AttributeSchema
from .errors import ConfigError

BINS = ("round", "equal")


def level_bins(schema: AttributeSchema, bins: str = "round") -> list[tuple[float, float]]:
    """[(lower, upper)] on the unit interval for each integer level lo..hi."""
    lo, hi = schema.scale_min, schema.scale_max
    levels = int(round(hi - lo)) + 1
    if bins == "round":
        edges = [min(max((k - 0.5) / (hi - lo), 0.0), 1.0) for k in range(levels + 1)]
        return [(edges[k], edges[k + 1]) for k in range(levels)]
    if bins == "equal":
        return [(k / levels, (k + 1) / levels) for k in range(levels)]
    raise ConfigError(f"unknown likelihood bins {bins!r}; choose one of {BINS}")


def level_probabilities(score: float, schema: AttributeSchema, *, concentration: float = 24.0,
                        bins: str = "round", eps: float = 1e-4) -> np.ndarray:
    """P(a = level | r) for every level of the scale, from one RM output r."""
    r_s = (score - schema.scale_min) / (schema.scale_max - schema.scale_min)
    r_s = min(max(r_s, eps), 1.0 - eps)  # Beta(α, β) needs α, β > 0
    alpha = concentration * r_s
    beta = concentration - alpha
    edges = level_bins(schema, bins)
    cdf = betainc(alpha, beta, np.array([e[0] for e in edges] + [edges[-1][1]]))
    return np.diff(cdf)


def attribute_log_likelihood(scores: Mapping[str, float], target: Mapping[str, float], schema: AttributeSchema, *,
                             concentration: float = 24.0, bins: str = "round") -> float:
    """log P(a | x, y) = Σ_attributes log P(a_k = target_k | r_k)."""
    total = 0.0
    for name, level in target.items():
        if name not in scores or scores[name] is None:
            raise ConfigError(f"the RM gives no score for attribute {name!r}; likelihood attributes must be ones "
                              f"the RM was trained on")
        k = int(round(level - schema.scale_min))
        p = level_probabilities(float(scores[name]), schema, concentration=concentration, bins=bins)[k]
        total += math.log(max(float(p), 1e-30))
    return total


def target_weights(log_p_a: torch.Tensor, log_p_y: torch.Tensor, log_q_prime: torch.Tensor) -> torch.Tensor:
    """w' = softmax(log P(a|x,y) + log P(y|x) − log Q'(y|a,x)) over the n responses of a group."""
    return torch.softmax(log_p_a + log_p_y - log_q_prime, dim=-1)


def baseline_weights(log_q_theta: torch.Tensor, log_q_prime: torch.Tensor) -> torch.Tensor:
    """b' = softmax(log Q_θ − log Q'), without gradient."""
    return torch.softmax(log_q_theta.detach() - log_q_prime, dim=-1)


def listwise_loss(log_q_theta: torch.Tensor, w: torch.Tensor, log_q_prime: torch.Tensor,
                  n_tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One group of n responses. log_q_theta (n,) carries the gradient; w (n,) are the target weights.

    -> (loss, {distance, baseline}); ∂loss/∂θ = −Σ (w − b) ∂log Q_θ/∂θ / L̄.
    """
    b = baseline_weights(log_q_theta, log_q_prime)
    coef = (w - b).detach()
    loss = -(coef * log_q_theta).sum() / n_tokens.float().mean()
    distance = (w * (torch.log(w + 1e-8) - torch.log(b + 1e-8))).sum()
    return loss, {"distance": float(distance), "baseline": b}
