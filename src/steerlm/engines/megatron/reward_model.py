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
from .model import (MegatronWrapper, as_hidden_state_model, build_gpt, gather_hf_state, gpt_forward, load_hf_state,
                    pipeline_forward_backward)


class MegatronRewardModel(MegatronWrapper):
    """PP > 1: the backbone's layers are split over the stages and only the last stage's head is used (every stage
    holds a copy so the module tree is the same everywhere); `forward` and `pipeline_losses` run Megatron's schedule."""
    def __init__(self, rm: AttributeRewardModel, *, tp: int, pp: int = 1, sequence_parallel: bool = False,
                 recompute: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.schema, self.head_name, self.pipelined = rm.schema, rm.head_name, pp > 1
        hf_state = {k: v for k, v in rm.hf_model.state_dict().items() if k.startswith("model.")}
        if len(hf_state) == 0:
            raise ValueError(f"{type(rm.hf_model).__name__}: expected the backbone under 'model.'")
        self.gpt = as_hidden_state_model(build_gpt(rm.hf_model.config, tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                                   recompute=recompute, dtype=dtype))
        load_hf_state(self.gpt, hf_state)
        self.head = nn.Linear(rm.head.in_features, rm.head.out_features, bias=rm.head.bias is not None)
        self.head.load_state_dict(rm.head.state_dict())
        self.head.float()
        self.keep_skeleton(rm.hf_model)

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded -> (B, H) fp32 final hidden state at the last real token, on every rank (PP > 1:
        forward only through the schedule, broadcast from the last stage). Attention is causal only, so with
        right padding every real token sees exactly the real tokens before it."""
        if bool((attention_mask[:, 0] == 0).any()):
            raise ValueError("engine=megatron reads right-padded batches (a row starts with padding)")
        if self.pipelined:
            pooled = []

            def keep(hidden, mb):
                pooled.append(self._pool(hidden, mb).detach())
                zero = hidden.sum() * 0
                return zero, zero

            pipeline_forward_backward(self.gpt, [{"input_ids": input_ids, "attention_mask": attention_mask}], keep,
                                      forward_only=True)
            return self._from_last_stage(pooled[0] if pooled else None, (input_ids.shape[0], self.head.in_features))
        hidden = gpt_forward(self.gpt, input_ids)  # (B, T, H)
        return self._pool(hidden, {"attention_mask": attention_mask, "rows": input_ids.shape[0]})

    @staticmethod
    def _pool(hidden: torch.Tensor, mb: dict) -> torch.Tensor:
        """The last real token's hidden state of each of the micro-batch's own rows (the schedule pads rows)."""
        n = mb["rows"]
        idx = last_token_index(mb["attention_mask"][:n])
        return hidden[torch.arange(n, device=hidden.device), idx].float()

    def score_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.head(pooled.float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pipelined:  # predictions only (evaluation, labeling): the last stage's head, broadcast
            preds = []

            def keep_pred(pred, mb):
                preds.append(pred.detach())
                return pred.sum() * 0, pred.sum() * 0

            self.pipeline_losses([{"input_ids": input_ids, "attention_mask": attention_mask}], keep_pred,
                                 forward_only=True)
            return self._from_last_stage(preds[0] if preds else None, (input_ids.shape[0], self.head.out_features))
        return self.score_pooled(self.pooled_hidden(input_ids, attention_mask))

    def pipeline_losses(self, micro: list[dict], loss_of, forward_only: bool = False) -> list[float]:
        """PP > 1: micro-batches (dicts with right-padded `input_ids`, `attention_mask` and whatever `loss_of` reads)
        through Megatron's 1F1B schedule. On the last stage, `loss_of(pred (B, K), mb)` -> (the micro-batch's loss
        for its backward, a value to report). -> every micro-batch's reported value, on every rank of the pipeline."""
        return pipeline_forward_backward(self.gpt, micro, lambda hidden, mb: loss_of(self.score_pooled(
            self._pool(hidden, mb)), mb), forward_only=forward_only)

    def _from_last_stage(self, tensor, shape) -> torch.Tensor:
        """The last pipeline stage's tensor, on every stage."""
        from megatron.core import parallel_state as ps

        if tensor is None:
            tensor = torch.zeros(shape, dtype=torch.float32, device=self.head.weight.device)
        torch.distributed.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
        return tensor

    def finish_grads(self) -> None:
        from .grads import finish_grads

        finish_grads(self)

    def freeze_backbone(self) -> None:
        for p in self.gpt.parameters():
            p.requires_grad_(False)

    def extra_params(self):
        return {f"head.{k}": p for k, p in self.head.named_parameters()}

    def full_state(self) -> dict[str, torch.Tensor]:
        """The HF state dict with AttributeRewardModel's key names (`hf_model.model.*` for the backbone,
        `hf_model.<head>.*`) on global rank 0, {} elsewhere; collective. PP: the trained head is the last stage's."""
        head = {}
        for name, p in self.head.named_parameters():
            t = p.detach().float().contiguous().clone()
            if self.pipelined:
                t = self._from_last_stage(t, p.shape)
            head[f"hf_model.{self.head_name}.{name}"] = t.cpu()
        backbone = gather_hf_state(self.gpt)
        return {} if backbone is None else {**{"hf_model." + k: v for k, v in backbone.items()}, **head}
