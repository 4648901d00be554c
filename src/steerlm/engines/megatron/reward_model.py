"""The attribute reward model on Megatron-core: a TP-sharded GPTModel returning final-norm hidden states, and the
same fp32 K-output head as `steerlm.models.reward_model.AttributeRewardModel` (replicated on every rank).

It is built from an `AttributeRewardModel` (a base LM with a fresh head, or a steerlm RM checkpoint) and exports
back to exactly that HF checkpoint layout (`XForSequenceClassification`: backbone `model.*` + `score.weight`),
so labeling, PPO and plain transformers read a Megatron-trained RM like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.reward_model import AttributeRewardModel, last_token_index
from .model import as_hidden_state_model, build_gpt, gather_hf_state, load_hf_state


class MegatronRewardModel(nn.Module):
    is_megatron = True

    def __init__(self, rm: AttributeRewardModel, *, tp: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.schema, self.head_name = rm.schema, rm.head_name
        hf_state = {k: v for k, v in rm.hf_model.state_dict().items() if k.startswith("model.")}
        if len(hf_state) == 0:
            raise ValueError(f"{type(rm.hf_model).__name__}: expected the backbone under 'model.'")
        self.gpt = as_hidden_state_model(build_gpt(rm.hf_model.config, tp=tp, dtype=dtype))
        load_hf_state(self.gpt, hf_state)
        self.head = nn.Linear(rm.head.in_features, rm.head.out_features, bias=rm.head.bias is not None)
        self.head.load_state_dict(rm.head.state_dict())
        self.head.float()
        # the HF model stays as a weightless skeleton (config and class for save_pretrained at export), held
        # outside the module tree so .to(device) and .parameters() never see it
        self._skeleton = (rm.hf_model.to("meta"),)

    @property
    def hf_model(self):
        return self._skeleton[0]

    @property
    def config(self):
        return self.hf_model.config

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded -> (B, H) fp32 final hidden state at the last real token. Attention is causal only,
        so with right padding every real token sees exactly the real tokens before it."""
        if bool((attention_mask[:, 0] == 0).any()):
            raise ValueError("engine=megatron reads right-padded batches (a row starts with padding)")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        hidden = self.gpt(input_ids=input_ids, position_ids=positions, attention_mask=None)  # (B, T, H)
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()

    def score_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.head(pooled.float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score_pooled(self.pooled_hidden(input_ids, attention_mask))

    def freeze_backbone(self) -> None:
        for p in self.gpt.parameters():
            p.requires_grad_(False)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The HF state dict with AttributeRewardModel's key names (`hf_model.…`) on global rank 0, {} elsewhere."""
        backbone = gather_hf_state(self.gpt)
        if backbone is None:
            return {}
        head = {f"{self.head_name}.{k}": v.detach().cpu() for k, v in self.head.state_dict().items()}
        return {f"hf_model.{k}": v for k, v in {**backbone, **head}.items()}
