"""Reward-model losses against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from steerlm.losses import bradley_terry, masked_mse, scalarize

M = -100.0  # NeMo-Aligner's missing marker; masked entries must not leak into the loss


def three_samples():
    """(pred, labels, mask) for 3 samples x 3 attributes with 3, 2 and 1 annotated attributes."""
    pred = torch.tensor([[1.0, 2.0, 3.0],
                         [0.0, 0.0, 0.0],
                         [2.0, 2.0, 2.0]], requires_grad=True)
    labels = torch.tensor([[2.0, 4.0, 0.0],
                           [1.0, M, 3.0],
                           [M, M, 4.0]])
    mask = torch.tensor([[True, True, True],
                         [True, False, True],
                         [False, False, True]])
    return pred, labels, mask


def test_masked_mse_is_a_per_sample_mean_over_present_attributes():
    """loss_i = Σ_k m_ik (ŷ_ik − y_ik)² / Σ_k m_ik

    sample 0: ((1−2)² + (2−4)² + (3−0)²) / 3 = (1 + 4 + 9) / 3 = 14/3
    sample 1: ((0−1)² + (0−3)²) / 2          = (1 + 9) / 2     = 5      (the −100 entry is ignored)
    sample 2: (2−4)² / 1                                        = 4
    """
    pred, labels, mask = three_samples()
    loss = masked_mse(pred, labels, mask)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.tensor([14 / 3, 5.0, 4.0]))
    # not NeMo-Aligner's per-element micro-batch mean (14 + 10 + 4) / 6 = 4.667: every sample weighs the same
    assert not math.isclose(loss.mean().item(), 28 / 6, rel_tol=1e-3)
    torch.testing.assert_close(loss.mean(), torch.tensor((14 / 3 + 5 + 4) / 3))


def test_masked_mse_gradient_is_zero_on_masked_entries():
    """∂loss_i/∂ŷ_ik = 2 m_ik (ŷ_ik − y_ik) / n_i

    sample 0 (n=3): 2(−1)/3, 2(−2)/3, 2(3)/3 = −2/3, −4/3, 2
    sample 1 (n=2): 2(−1)/2, 0, 2(−3)/2      = −1, 0, −3
    sample 2 (n=1): 0, 0, 2(−2)/1            = 0, 0, −4
    """
    pred, labels, mask = three_samples()
    masked_mse(pred, labels, mask).sum().backward()
    expected = torch.tensor([[-2 / 3, -4 / 3, 2.0],
                             [-1.0, 0.0, -3.0],
                             [0.0, 0.0, -4.0]])
    torch.testing.assert_close(pred.grad, expected)
    assert (pred.grad[~mask] == 0).all()


def test_masked_mse_labels_as_other_dtype_and_float_mask():
    pred, labels, mask = three_samples()
    loss = masked_mse(pred.detach().double(), labels, mask.float())
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor([14 / 3, 5.0, 4.0], dtype=torch.float64))


def test_masked_mse_sample_without_labels_is_an_error():
    pred, labels, mask = three_samples()
    mask[1] = False
    with pytest.raises(ValueError, match="no annotated attribute"):
        masked_mse(pred, labels, mask)


# ------------------------------------------------------------------ Bradley-Terry
LOG1P_EXP_M1 = math.log(1 + math.exp(-1))  # −log σ(1) = 0.31326...
LOG1P_EXP_1 = math.log(1 + math.exp(1))    # −log σ(−1) = 1.31326...


def test_bt_variants_at_delta_1_strength_2():
    """r_c = 1.5, r_r = 0.5 -> Δ = 1; m = 2

    bt:        −log σ(1)       = log(1 + e^−1)       = 0.313262
    margin_bt: −log σ(1 − 2)   = log(1 + e)          = 1.313262   (= bt + 1 exactly: log((1+e)/(1+e^−1)) = log e)
    scaled_bt: 2 · (−log σ(1)) = 2 log(1 + e^−1)     = 0.626523
    """
    rc, rr, m = torch.tensor([1.5]), torch.tensor([0.5]), torch.tensor([2.0])
    bt = bradley_terry(rc, rr, m, "bt")
    margin = bradley_terry(rc, rr, m, "margin_bt")
    scaled = bradley_terry(rc, rr, m, "scaled_bt")
    torch.testing.assert_close(bt, torch.tensor([LOG1P_EXP_M1]))
    torch.testing.assert_close(margin, torch.tensor([LOG1P_EXP_1]))
    torch.testing.assert_close(scaled, torch.tensor([2 * LOG1P_EXP_M1]))
    torch.testing.assert_close(margin - bt, torch.tensor([1.0]))
    assert bradley_terry(rc, rr, m).item() == bt.item()  # default variant is plain BT


def test_bt_is_per_pair_and_batched():
    """Δ = (0, 1, −1), m = (0, 1, 3)

    bt:        (log 2, log(1+e^−1), log(1+e))
    margin_bt: Δ − m = (0, 0, −4) -> (log 2, log 2, log(1+e^4))
    scaled_bt: (0 · log 2, 1 · log(1+e^−1), 3 log(1+e))
    """
    rc = torch.tensor([2.0, 3.0, 0.0])
    rr = torch.tensor([2.0, 2.0, 1.0])
    m = torch.tensor([0.0, 1.0, 3.0])
    l2 = math.log(2)
    torch.testing.assert_close(bradley_terry(rc, rr, m, "bt"), torch.tensor([l2, LOG1P_EXP_M1, LOG1P_EXP_1]))
    torch.testing.assert_close(bradley_terry(rc, rr, m, "margin_bt"),
                               torch.tensor([l2, l2, math.log(1 + math.exp(4))]))
    torch.testing.assert_close(bradley_terry(rc, rr, m, "scaled_bt"),
                               torch.tensor([0.0, LOG1P_EXP_M1, 3 * LOG1P_EXP_1]))


def test_bt_gradients():
    """∂(−log σ(Δ))/∂r_c = −σ(−Δ) = −(1 − σ(Δ)); at Δ = 1: −0.268941; ∂/∂r_r = +0.268941.
    scaled_bt at m = 0 is identically 0, so it has zero gradient (a tie teaches nothing)."""
    rc = torch.tensor([1.5, 1.5], requires_grad=True)
    rr = torch.tensor([0.5, 0.5], requires_grad=True)
    bradley_terry(rc, rr, torch.tensor([1.0, 1.0]), "bt").sum().backward()
    g = 1 / (1 + math.e)  # σ(−1)
    torch.testing.assert_close(rc.grad, torch.tensor([-g, -g]))
    torch.testing.assert_close(rr.grad, torch.tensor([g, g]))

    rc.grad, rr.grad = None, None
    loss = bradley_terry(rc, rr, torch.tensor([0.0, 2.0]), "scaled_bt")
    assert loss[0].item() == 0.0
    loss.sum().backward()
    assert rc.grad[0].item() == 0.0 and rr.grad[0].item() == 0.0
    torch.testing.assert_close(rc.grad[1], torch.tensor(-2 * g))


def test_margin_bt_at_strength_0_equals_bt():
    rc, rr, m = torch.tensor([0.3, -2.0]), torch.tensor([1.0, -2.5]), torch.zeros(2)
    torch.testing.assert_close(bradley_terry(rc, rr, m, "margin_bt"), bradley_terry(rc, rr, m, "bt"))


def test_bt_computes_in_fp32_from_bf16_rewards():
    rc, rr = torch.tensor([1.5], dtype=torch.bfloat16), torch.tensor([0.5], dtype=torch.bfloat16)
    out = bradley_terry(rc, rr, torch.tensor([2], dtype=torch.int64), "scaled_bt")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([2 * LOG1P_EXP_M1]))


def test_unknown_pair_loss_is_an_error():
    with pytest.raises(ValueError, match="unknown pair loss 'hinge'"):
        bradley_terry(torch.zeros(1), torch.zeros(1), torch.zeros(1), "hinge")


# ------------------------------------------------------------------ scalarization
def test_scalarize():
    """[[1, 2, 3], [4, 5, 6]] · [0.5, 0, −1] = [0.5 − 3, 2 − 6] = [−2.5, −4]"""
    pred = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = scalarize(pred, torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-2.5, -4.0]))


def test_end_of_turn_weight_adds_w_minus_1_times_the_end_tokens_nll():
    from transformers import LlamaConfig, LlamaForCausalLM

    from steerlm.losses import next_token_nll, token_log_probs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    END = 7
    ids = torch.tensor([[1, 2, 3, 4, END, 5], [3, 3, 6, END, 9, END]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "loss_mask": mask}
    plain, n = next_token_nll(model, batch)
    weighted, n_w = next_token_nll(model, batch, torch.tensor([END]), 5.0)
    lp, _ = token_log_probs(model, batch)
    end_nll = -lp[(ids == END) & mask.bool()].sum()
    assert n == n_w == int(mask.sum())
    assert torch.allclose(weighted, plain + 4.0 * end_nll, atol=1e-5)
    assert torch.allclose(next_token_nll(model, batch, torch.tensor([END]), 1.0)[0], plain)
