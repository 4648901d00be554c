"""PPO math: GAE and returns against hand-computed values, reward scalarisation, losses, and a toy task."""

from __future__ import annotations

import pytest
import torch

from steerlm.attributes import get_schema, weights_vector
from steerlm.errors import ConfigError
from steerlm.ppo_math import (check_reward_heads, entropy, gae, masked_mean, policy_loss, scalar_reward,
                              standardisation, token_rewards, value_loss, whiten)

NEMO_70B = [0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4]


def test_gae_and_returns_equal_hand_computed_values():
    # row 0: γ=1, λ=0.95, reward on the last token
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.4, 0.3]]), torch.ones(1, 3), 1.0, 0.95)
    # δ2 = 1 − 0.3 = 0.7; δ1 = 0.3 − 0.4 = −0.1 -> A1 = −0.1 + 0.95·0.7; δ0 = 0.4 − 0.5 -> A0 = −0.1 + 0.95·A1
    a1 = -0.1 + 0.95 * 0.7
    assert torch.allclose(adv, torch.tensor([[-0.1 + 0.95 * a1, a1, 0.7]]))
    assert torch.allclose(ret, adv + torch.tensor([[0.5, 0.4, 0.3]]))
    # row with a prompt position before and padding after the response: γ=0.9, λ=0.8
    rewards = torch.tensor([[0.0, 0.2, 1.0, 0.0]])
    values = torch.tensor([[7.0, 1.0, 2.0, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    # δ2 = 1 + 0.9·0 − 2 = −1 (V after the last response token is 0); δ1 = 0.2 + 0.9·2 − 1 = 1 -> A1 = 1 + 0.72·(−1)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.28, -1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 1.28, 1.0, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_response_token_minus_kl():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([2.0]), lp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.0, -1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.1, 2.0, 0.0]]))
    rewards, kl = token_rewards(torch.tensor([2.0]), lp, ref, mask, kl_coef=0.1, absolute_kl=True)
    assert torch.allclose(rewards, torch.tensor([[0.0, -0.1, 2.0, 0.0]]))


def test_reward_scalarisation_and_standardisation():
    schema = get_schema("steerlm9")
    w = torch.tensor(weights_vector(schema, NEMO_70B))
    a = torch.tensor([[1, 1, 1, 1, 4, 4, 4, 2, 1], [0, 0, 0, 0, 2, 3, 4, 1, 3.0]])
    raw = torch.tensor([0.65 * 4 + 0.8 * 4 + 0.45 * 4 + 0.55 * 2 - 0.4, 0.65 * 2 + 0.8 * 3 + 0.45 * 4 + 0.55 - 1.2])
    assert torch.allclose(scalar_reward(a, w), raw)
    mean, std = standardisation(a, w)
    assert mean == pytest.approx(float(raw.mean())) and std == pytest.approx(float(raw.std()))
    assert torch.allclose(scalar_reward(a, w, mean, std), (raw - raw.mean()) / raw.std())
    with pytest.raises(ConfigError, match="std must be > 0"):
        scalar_reward(a, w, 0.0, 0.0)


def test_head_count_mismatch_is_an_error():
    schema = get_schema("steerlm9")
    check_reward_heads(9, schema, NEMO_70B)
    with pytest.raises(ConfigError, match="the RM has 1 output heads but its schema 'steerlm9' has 9"):
        check_reward_heads(1, schema, NEMO_70B)  # NeMo-Aligner's critic default would silently reshape this
    with pytest.raises(ConfigError, match="reward.weights has 5 entries for an RM with 9 heads"):
        check_reward_heads(9, schema, [0.65, 0.8, 0.45, 0.55, -0.4])


def test_policy_and_value_losses_on_known_numbers():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    loss, info = policy_loss(old.clone(), old, adv, mask, clip_eps=0.2)  # ratio 1: −mean(A) over the response
    assert float(loss) == pytest.approx(0.5) and info["clip_fraction"] == 0.0
    new = old + torch.log(torch.tensor([[1.5, 1.5, 1.0]]))  # ratio 1.5: A>0 clipped to 1.2, A<0 keeps 1.5
    loss, info = policy_loss(new, old, adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-(1.2 * 1.0 + 1.5 * -2.0) / 2) and info["clip_fraction"] == 1.0
    v_loss, info = value_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]]),
                              torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (2−3)² = 1, clipped (1.2−3)² = 3.24 -> 3.24; token 1: (0−1)² both -> 1
    assert float(v_loss) == pytest.approx(0.5 * (3.24 + 1.0) / 2) and info["value_clip_fraction"] == 0.5


def test_whiten_and_entropy():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert float(masked_mean(w, mask)) == pytest.approx(0.0, abs=1e-6) and float(w[0, 3]) == 0.0
    assert float(masked_mean(w ** 2, mask)) == pytest.approx(1.0, abs=1e-4)
    uniform = torch.zeros(1, 2, 4)
    assert float(entropy(uniform, torch.ones(1, 2))) == pytest.approx(float(torch.log(torch.tensor(4.0))))


def run_toy_ppo(kl_coef: float, iterations: int = 40, T: int = 4, V: int = 6, B: int = 64):
    """Known optimum: a T-token response scores the fraction of its tokens equal to 3 (vocabulary of V).
    Policy and critic are free tables. -> (rewards per iteration, KL per iteration, final policy)."""
    torch.manual_seed(0)
    theta = torch.zeros(T, V, requires_grad=True)
    ref = theta.detach().clone()
    value_table = torch.zeros(T, requires_grad=True)
    opt = torch.optim.Adam([theta, value_table], lr=0.05)
    mask = torch.ones(B, T)
    rewards_seen, kls = [], []
    for _ in range(iterations):
        with torch.no_grad():
            ys = torch.distributions.Categorical(logits=theta.expand(B, T, V)).sample()
            old_lp = torch.log_softmax(theta, -1).expand(B, T, V).gather(-1, ys.unsqueeze(-1)).squeeze(-1)
            ref_lp = torch.log_softmax(ref, -1).expand(B, T, V).gather(-1, ys.unsqueeze(-1)).squeeze(-1)
            score = (ys == 3).float().mean(-1)
            old_values = value_table.expand(B, T).clone()
            rewards, kl = token_rewards(score, old_lp, ref_lp, mask, kl_coef=kl_coef)
            adv, ret = gae(rewards, old_values, mask, 1.0, 0.95)
            adv = whiten(adv, mask)
        rewards_seen.append(float(score.mean()))
        kls.append(float(kl.sum(-1).mean()))
        for _ in range(4):  # PPO epochs over the rollout batch
            lp = torch.log_softmax(theta, -1).expand(B, T, V).gather(-1, ys.unsqueeze(-1)).squeeze(-1)
            p_loss, _ = policy_loss(lp, old_lp, adv, mask, clip_eps=0.2)
            v_loss, _ = value_loss(value_table.expand(B, T), old_values, ret, mask, clip=0.2)
            opt.zero_grad()
            (p_loss + 0.5 * v_loss).backward()
            opt.step()
    return rewards_seen, kls, torch.softmax(theta.detach(), -1)


def optimal_kl(kl_coef: float, T: int = 4, V: int = 6) -> float:
    """KL(π* ‖ π_ref) of the KL-regularised optimum π* ∝ π_ref · exp(r/β), r = 1/T per token 3, π_ref uniform."""
    import math

    e = math.exp(1.0 / T / kl_coef)
    p = e / (e + V - 1)
    q = (1 - p) / (V - 1)
    return T * (p * math.log(p * V) + (V - 1) * q * math.log(q * V))


def test_ppo_raises_the_reward_on_a_toy_task_and_keeps_kl_bounded():
    exact_kl = lambda pi: float((pi * torch.log(pi * pi.shape[-1])).sum())  # KL(π ‖ uniform reference), summed over T
    rewards, kls, policy = run_toy_ppo(kl_coef=0.05)
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert start < 0.3 and end > 0.7, (start, end)  # uniform start: 1/6
    assert float(policy[:, 3].min()) > 0.5
    # the KL penalty bounds the drift at its regularised optimum (β = 0.05: 6.38 nats per response)
    assert exact_kl(policy) < 1.1 * optimal_kl(0.05) and max(kls) < 1.2 * optimal_kl(0.05)
    # a 10x stronger penalty keeps the policy much closer to the reference (optimum 0.085 nats), and earns less
    rewards_strong, _, policy_strong = run_toy_ppo(kl_coef=0.5)
    assert exact_kl(policy_strong) < 2 * optimal_kl(0.5) < exact_kl(policy)
    assert sum(rewards_strong[-5:]) / 5 < end
