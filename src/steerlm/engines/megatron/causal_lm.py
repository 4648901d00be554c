"""The SFT policy on Megatron-core: a TP-sharded GPTModel trained with the vocab-parallel cross entropy (the full
(tokens x vocabulary) logits are never gathered), exported back to the HF causal-LM checkpoint it came from, or,
with LoRA (lora.py), to a peft adapter of it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...errors import ConfigError
from .model import MegatronWrapper, build_gpt, gather_shards, load_hf_state, pipeline_forward_backward, token_nll


class MegatronCausalLM(MegatronWrapper):
    def __init__(self, hf_model: nn.Module, *, tp: int, pp: int = 1, sequence_parallel: bool = False,
                 recompute: bool = False, dtype: torch.dtype = torch.float32, lora: Optional[dict] = None):
        super().__init__()
        self.pipelined = pp > 1
        self.gpt = build_gpt(hf_model.config, tp=tp, pp=pp, sequence_parallel=sequence_parallel, recompute=recompute,
                             dtype=dtype)
        load_hf_state(self.gpt, hf_model.state_dict())
        self.lora = lora
        if lora:  # the export is a peft adapter: keep a peft-wrapped skeleton for its config and key names
            from ...models.policy import apply_lora as apply_peft
            from .lora import apply_lora, megatron_targets

            if float(lora.get("dropout", 0.0)) > 0:
                raise ConfigError("engine=megatron LoRA has no dropout yet: set model.lora.dropout=0")
            apply_lora(self.gpt, r=int(lora["r"]), alpha=float(lora["alpha"]),
                       targets=megatron_targets(lora.get("target_modules", "all-linear")))
            hf_model = apply_peft(hf_model.to("meta"), lora)
        self.keep_skeleton(hf_model)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The HF state dict on global rank 0 ({} elsewhere); with LoRA the adapter, in peft's names; collective."""
        if not self.lora:
            return super().full_state()
        from megatron.core import parallel_state as ps

        from .lora import lora_to_hf

        shards = gather_shards(self.gpt, keep=lambda name: ".lora_" in name)
        if shards is None:
            return {}
        hf = lora_to_hf(shards, self.gpt.hf_shape, ps.get_tensor_model_parallel_world_size(),
                        ps.get_pipeline_model_parallel_world_size())
        # peft's module names (adapter "default"): what save_pretrained(state_dict=...) expects
        return {"base_model.model." + k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                for k, v in hf.items()}

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
        from .grads import finish_grads

        finish_grads(self)

    def next_token_nll(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Σ_t −log p(x_{t+1} | x_≤t) over the trained targets (`loss_mask`), and their count: the same contract
        as `steerlm.losses.next_token_nll`. Rows are right-padded; packed rows (`position_ids`) attend within their
        own sequence only."""
        labels, keep = self._targets(batch)
        nll = token_nll(self.gpt, batch["input_ids"], labels, batch.get("position_ids")).float()  # (B, S)
        return (nll * keep).sum(), int(keep.sum())
