"""Losses. Reward model: each returns one loss per sample (or pair); the caller reduces. Causal LM: the
log-probabilities of trained tokens, computed only where they are trained.

Per-sample losses let the engine reduce by the *global* batch size (sum of per-sample losses
divided by the number of samples in the optimizer step), which makes 1 process, DDP and FSDP2
and any micro-batch / accumulation split give the same gradient.

References: NeMo-Aligner `megatron_gpt_regression_reward_model.py` (af2b3bd9) `reg_loss_func`
and `bt_loss_func`; HelpSteer2-Preference (arXiv 2410.01257) §3 for scaled BT.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("mse", "bt", "margin_bt", "scaled_bt")
PAIR_LOSSES = ("bt", "margin_bt", "scaled_bt")


def masked_mse(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the attributes that sample annotates.

        loss_i = Σ_k m_ik (ŷ_ik − y_ik)² / Σ_k m_ik

    pred, labels: (B, K) float; mask: (B, K) bool, False where the attribute is missing (its head
    gets no gradient from that sample). Unlike NeMo-Aligner, which averages over all present entries
    of the micro-batch, every *sample* weighs the same whatever number of attributes it carries,
    so a 5-label HelpSteer2 row does not outweigh a 4-label OASST row by its label count.
    Returns (B,). A sample with no annotated attribute is an error (it would train nothing).
    """
    mask = mask.to(pred.dtype)
    n = mask.sum(dim=1)
    if bool((n == 0).any()):
        raise ValueError("masked_mse: a sample has no annotated attribute")
    sq = (pred - labels.to(pred.dtype)).pow(2) * mask
    return sq.sum(dim=1) / n


def order_hinge(s_high: torch.Tensor, s_low: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-pair ordering loss on one head: max(0, m − (s_high − s_low)), (B,).

    A hinge, not BT: once a pair is ordered by the margin it stops pulling, so the head's scale stays the
    one the regression labels set (BT's −log σ(Δ) keeps growing Δ and stretched the verbosity head to ±15
    on the bundled data, docs/steerability.md).
    """
    return torch.relu(margin - (s_high.float() - s_low.float()))


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, strength: torch.Tensor,
                  variant: str = "bt") -> torch.Tensor:
    """Per-pair Bradley-Terry losses on scalar rewards r (B,) with preference strength m >= 0 (B,).

        bt:         −log σ(r_c − r_r)
        margin_bt:  −log σ(r_c − r_r − m)
        scaled_bt:  m · (−log σ(r_c − r_r))      (HelpSteer2-Preference's "Scaled BT")
    """
    delta = r_chosen.float() - r_rejected.float()
    strength = strength.to(delta.dtype)
    if variant == "bt":
        return -F.logsigmoid(delta)
    if variant == "margin_bt":
        return -F.logsigmoid(delta - strength)
    if variant == "scaled_bt":
        return strength * -F.logsigmoid(delta)
    raise ValueError(f"unknown pair loss {variant!r}; choose one of {PAIR_LOSSES}")


def scalarize(pred: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, K) attribute predictions · (K,) weights -> (B,) scalar reward."""
    return pred @ weights.to(pred.dtype)


# ----------------------------------------------------------------------------- causal LM (SFT, SteerLM 2.0, PPO)
def target_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict each trained token -> (logits (N, V) fp32, targets (N,), keep (B, T) bool).

    `loss_mask[r, t]` marks token t of row r as trained; it is predicted at position t − 1, so
    `keep[r, t − 1]` is set. Logits are computed only there (`logits_to_keep` as a boolean mask):
    prompts, attribute strings and padding never reach the (vocab-sized) LM head, which saves its
    FLOPs and the (tokens x vocab) fp32 logits memory, and the model's own head code (soft-capping,
    scaling) still runs. Rows come back in row-major order of `keep`.
    """
    ids, m = batch["input_ids"], batch["loss_mask"].bool()
    keep = torch.zeros_like(m)
    keep[:, :-1] = m[:, 1:]
    targets = ids[:, 1:][m[:, 1:]]
    extra = {k: batch[k] for k in ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k",
                                   "max_length_q", "max_length_k") if k in batch}
    logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False, **extra).logits  # (N, V)
    return logits.float(), targets, keep


def next_token_nll(model, batch: dict, end_ids: Optional[torch.Tensor] = None,
                   end_weight: float = 1.0) -> tuple[torch.Tensor, int]:
    """Σ_t w_t · −log p(x_{t+1} | x_≤t) over trained targets, and the number of targets.

    The sum (not the mean) is returned so the caller can divide by the trained-token count of the
    whole global batch: the step is then the same for any packing, micro-batching or world size.
    w_t = end_weight where x_{t+1} is an end-of-turn id in `end_ids`, else 1: a response's length is
    decided by that one token, 1/|y| of its loss (AC-SFT's verbosity string acts mostly there).
    """
    if getattr(model, "is_megatron", False):  # engine=megatron: vocab-parallel cross entropy on TP shards
        if end_weight != 1.0:
            raise ValueError("end_of_turn_weight is a torch-engine option")
        return model.next_token_nll(batch)
    logits, targets, _ = target_logits(model, batch)
    if end_weight == 1.0 or end_ids is None:
        return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())
    nll = F.cross_entropy(logits, targets, reduction="none")
    w = torch.where(torch.isin(targets, end_ids.to(targets.device)), float(end_weight), 1.0)
    return (nll * w.to(nll.dtype)).sum(), int(targets.numel())


def token_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token_t | tokens_<t) at every trained token t, 0 elsewhere -> ((B, T), the (N, V) logits)."""
    logits, targets, keep = target_logits(model, batch)
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(keep.shape, dtype=lp.dtype, device=lp.device)
    out[:, 1:][keep[:, :-1]] = lp
    return out, logits


def sequence_log_probs(model, batch: dict) -> torch.Tensor:
    """Teacher-forced Σ_t log p(token_t | prefix) over the trained (response) tokens of each row -> (rows,)."""
    return token_log_probs(model, batch)[0].sum(-1)


def nll_and_sequence_log_probs(model, batch: dict, seq_index: torch.Tensor, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward -> (Σ −log p over all trained tokens, (n_seqs,) Σ log p per sequence).

    seq_index (B, T): which sequence (0..n_seqs−1) each token belongs to, −1 for none (padding): packed rows
    hold several conversations, and a contrastive term needs each one's own response log-likelihood.
    """
    lp, _ = token_log_probs(model, batch)
    keep = seq_index >= 0
    per_seq = torch.zeros(n_seqs, dtype=lp.dtype, device=lp.device).index_add_(0, seq_index[keep], lp[keep])
    return -lp.sum(), per_seq


def contrast_loss(own: torch.Tensor, other: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ_c −log σ(β (log π(y_c | x_c, ℓ_c) − log π(y_c | x_c, ℓ'_c))): each response must be more likely under its
    own label ℓ than under the far level ℓ' of one attribute (a Bradley-Terry loss on label strings, where
    DPO compares responses). Both log-likelihoods are sums over the response's tokens."""
    return F.softplus(-beta * (own - other)).sum()
