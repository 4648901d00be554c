"""The multi-attribute regression reward model: any HF decoder + an fp32 linear head with K outputs.

The model *is* a transformers `AutoModelForSequenceClassification` (num_labels=K,
problem_type="regression", id2label = attribute names), so a saved steerlm RM loads in plain
transformers and predicts what steerlm predicts. steerlm's own forward differs only in speed and
precision, not in result:

- it pools before the head (HF applies the head to every position, then picks one), and
- it runs the head in fp32 on the pooled hidden state, whatever the backbone's dtype.

Pooling reads the last non-pad token from the attention mask, so left and right padding both
work. HF pools by `pad_token_id`, which agrees as long as the last real token is not the pad
token: `check_pad_token` enforces that when inputs are tokenized.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..attributes import SCHEMA_FILE, AttributeSchema, SchemaMismatchError
from .embedded import resolve_model_path

HEAD_NAMES = ("score", "classifier")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of the rightmost 1 in each row (left or right padding)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


class AttributeRewardModel(nn.Module):
    """Wraps an `XForSequenceClassification` and exposes steerlm's pooled fp32 forward.

    Args:
        hf_model: a transformers sequence-classification model with K = len(schema) labels.
        schema: the attribute schema; head output k is `schema.attributes[k]`.
    """

    def __init__(self, hf_model: nn.Module, schema: AttributeSchema):
        super().__init__()
        if hf_model.config.num_labels != len(schema):
            raise ValueError(f"model has {hf_model.config.num_labels} outputs, schema {schema.name!r} has {len(schema)}")
        self.hf_model = hf_model
        self.schema = schema
        head_name = next((n for n in HEAD_NAMES if isinstance(getattr(hf_model, n, None), nn.Linear)), None)
        if head_name is None:
            raise ValueError(f"{type(hf_model).__name__} has no linear head named one of {HEAD_NAMES}")
        self.head_name = head_name
        self.head.float()  # fp32 head: the regression targets need the precision, the cost is nil

    @property
    def head(self) -> nn.Linear:
        return getattr(self.hf_model, self.head_name)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.hf_model, self.hf_model.base_model_prefix)

    @property
    def config(self):
        return self.hf_model.config

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, H) final hidden state at the last real token, in fp32."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()  # (B, H)

    def score_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H) fp32 features -> (B, K) attribute predictions, outside any autocast region."""
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.head(pooled.float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and mask -> (B, K) fp32 attribute predictions."""
        return self.score_pooled(self.pooled_hidden(input_ids, attention_mask))

    def freeze_backbone(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(False)


def check_pad_token(input_ids: list[int], pad_token_id: int, where: str) -> None:
    """HF pools by pad id: an input whose last token *is* the pad id would be scored elsewhere."""
    if input_ids and input_ids[-1] == pad_token_id:
        raise ValueError(f"{where}: the last token of the RM input is the pad token (id {pad_token_id}); "
                         "set model.pad_token to a token that never ends an input")


def is_reward_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, SCHEMA_FILE))


def check_checkpoint_schema(path: str, schema: AttributeSchema) -> None:
    """If `path` is a steerlm RM, its schema must equal `schema` (SchemaMismatchError otherwise)."""
    local = resolve_model_path(path)
    if is_reward_checkpoint(local):
        AttributeSchema.load(local).require_same(schema, what=f"checkpoint {path}", other_what="this run")


def load_tokenizer(path: str, pad_token: Optional[str] = None):
    """Tokenizer with a pad token; never runs remote code."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=False)
    if pad_token is not None:
        tok.pad_token = pad_token
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise ValueError(f"{path}: tokenizer has no pad token and no eos token; set model.pad_token")
    return tok


def load_reward_model(path: str, schema: AttributeSchema, *, pad_token_id: int,
                      dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None,
                      require_rm: bool = False) -> AttributeRewardModel:
    """Build the RM from a base LM (new head) or load a steerlm RM checkpoint (trained head).

    A steerlm checkpoint carries `attribute_schema.json`; loading it under a different schema is a
    `SchemaMismatchError`, never a silent reshape. A base LM gets a fresh K-output head.
    """
    from transformers import AutoModelForSequenceClassification

    local = resolve_model_path(path)
    kwargs = dict(dtype=dtype, trust_remote_code=False)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if is_reward_checkpoint(local):
        check_checkpoint_schema(local, schema)
        hf = AutoModelForSequenceClassification.from_pretrained(local, **kwargs)
        if hf.config.num_labels != len(schema):  # a head that does not match its own schema file: never reshaped
            raise SchemaMismatchError(f"{path}: the RM's head has {hf.config.num_labels} outputs but its "
                                      f"{SCHEMA_FILE} lists {len(schema)} attributes ({schema.name}); the directory "
                                      f"was changed after training, retrain or restore it")
    else:
        if require_rm:
            raise FileNotFoundError(f"{path}: not a steerlm reward model (no {SCHEMA_FILE})")
        hf = AutoModelForSequenceClassification.from_pretrained(
            local, num_labels=len(schema), problem_type="regression",
            id2label=dict(enumerate(schema.attributes)), label2id={a: i for i, a in enumerate(schema.attributes)},
            **kwargs)
    hf.config.pad_token_id = pad_token_id
    hf.config.problem_type = "regression"
    return AttributeRewardModel(hf, schema)
