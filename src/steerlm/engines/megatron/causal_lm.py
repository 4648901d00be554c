"""The SFT policy on Megatron-core: a TP-sharded GPTModel trained with the vocab-parallel cross entropy (the full
(tokens x vocabulary) logits are never gathered), exported back to the HF causal-LM checkpoint it came from."""

from __future__ import annotations

import torch
from torch import nn

from .model import MegatronWrapper, build_gpt, load_hf_state, pipeline_forward_backward, token_nll


class MegatronCausalLM(MegatronWrapper):
    def __init__(self, hf_model: nn.Module, *, tp: int, pp: int = 1, sequence_parallel: bool = False,
                 recompute: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.pipelined = pp > 1
        self.gpt = build_gpt(hf_model.config, tp=tp, pp=pp, sequence_parallel=sequence_parallel, recompute=recompute,
                             dtype=dtype)
        load_hf_state(self.gpt, hf_model.state_dict())
        self.keep_skeleton(hf_model)

    @staticmethod
    def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, keep): target t+1 is predicted at position t, trained where `loss_mask[t+1]`."""
        ids, m = batch["input_ids"], batch["loss_mask"].bool()
        if "attention_mask" in batch and bool((batch["attention_mask"][:, 0] == 0).any()):
            raise ValueError("engine=megatron reads right-padded batches (a row starts with padding)")
        labels, keep = torch.zeros_like(ids), torch.zeros_like(m)
        labels[:, :-1], keep[:, :-1] = ids[:, 1:], m[:, 1:]
        return labels, keep

    def pipeline_nll(self, batches: list[dict], scales: list[float], forward_only: bool = False) -> list[float]:
        """PP > 1: one step's micro-batches through Megatron's 1F1B schedule. Micro-batch k contributes
        scale_k · Σ_t nll_t to the backward; -> every micro-batch's Σ_t nll_t over its targets, on every rank.
        Gradients stay local: call `finish_grads` after."""
        mbs = []
        for b, scale in zip(batches, scales):
            labels, keep = self._targets(b)
            mbs.append({"input_ids": b["input_ids"], "labels": labels, "keep": keep.float(), "scale": scale,
                        **({"position_ids": b["position_ids"]} if "position_ids" in b else {})})

        def loss_fn(nll, mb):
            total = (nll.float() * mb["keep"]).sum()  # padding: keep = 0
            return total * mb["scale"], total

        return pipeline_forward_backward(self.gpt, mbs, loss_fn, forward_only=forward_only)

    def finish_grads(self) -> None:
        """After a pipelined backward: what DDP's hooks do on the PP=1 path, plus the tied-embedding sum."""
        from .engine import finish_grads

        finish_grads(self)

    def next_token_nll(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Σ_t −log p(x_{t+1} | x_≤t) over the trained targets (`loss_mask`), and their count: the same contract
        as `steerlm.losses.next_token_nll`. Rows are right-padded; packed rows (`position_ids`) attend within their
        own sequence only."""
        labels, keep = self._targets(batch)
        nll = token_nll(self.gpt, batch["input_ids"], labels, batch.get("position_ids")).float()  # (B, S)
        return (nll * keep).sum(), int(keep.sum())
