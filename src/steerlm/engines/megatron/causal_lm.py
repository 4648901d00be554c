"""The SFT policy on Megatron-core: a TP-sharded GPTModel trained with the vocab-parallel cross entropy (the full
(tokens x vocabulary) logits are never gathered), exported back to the HF causal-LM checkpoint it came from."""

from __future__ import annotations

import torch
from torch import nn

from .model import build_gpt, gather_hf_state, load_hf_state, token_nll


class MegatronCausalLM(nn.Module):
    is_megatron = True

    def __init__(self, hf_model: nn.Module, *, tp: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.gpt = build_gpt(hf_model.config, tp=tp, dtype=dtype)
        load_hf_state(self.gpt, hf_model.state_dict())
        self._skeleton = (hf_model.to("meta"),)  # config and class for save_pretrained; outside the module tree

    @property
    def hf_model(self):
        return self._skeleton[0]

    @property
    def config(self):
        return self.hf_model.config

    def next_token_nll(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Σ_t −log p(x_{t+1} | x_≤t) over the trained targets (`loss_mask`), and their count: the same contract
        as `steerlm.losses.next_token_nll`. Rows are right-padded; attention is causal only."""
        ids, m = batch["input_ids"], batch["loss_mask"].bool()
        if "attention_mask" in batch and bool((batch["attention_mask"][:, 0] == 0).any()):
            raise ValueError("engine=megatron reads right-padded batches (a row starts with padding)")
        labels = torch.zeros_like(ids)
        labels[:, :-1] = ids[:, 1:]
        keep = torch.zeros_like(m)
        keep[:, :-1] = m[:, 1:]  # target t+1 is predicted at position t
        nll = token_nll(self.gpt, ids, labels).float()  # (B, S)
        return (nll * keep).sum(), int(keep.sum())

    def full_state(self) -> dict[str, torch.Tensor]:
        """The HF state dict on global rank 0 ({} elsewhere); collective."""
        return gather_hf_state(self.gpt) or {}
