"""HF <-> Megatron-core weights and configs for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

Why hand-written, not megatron-bridge: on Python 3.11 megatron-bridge resolves to 0.3.1, which mis-loads the
row-parallel weights at TP=2 (logits off by 0.69, measured in ../shared/research/stack_feasibility.md), and the
releases that convert correctly (>= 0.6) need Python 3.12, a CUDA torch and a transformer_engine import.
The mapping below is pure tensor slicing: HF -> Megatron -> HF is bit-exact (tested at TP 1, 2 and PP 2).

Megatron layout per tensor-parallel rank r of T (local spec, no transformer_engine):
- `linear_qkv.weight`: for each of this rank's G/T query groups g, the group's query heads, then k_g, then v_g
  (rows); HF keeps q, k and v as three matrices.
- `linear_fc1.weight`: [gate_r; up_r], the r-th row block of each of HF's gate_proj and up_proj.
- column-parallel (rows split): embedding, output_layer, qkv, fc1. Row-parallel (columns split): linear_proj
  (o_proj), linear_fc2 (down_proj). Norms are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ...errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class DecoderShape:
    """What the mapping needs to know about an HF decoder config."""
    layers: int
    hidden: int
    heads: int
    groups: int             # key/value heads (query groups)
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, config) -> "DecoderShape":
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED:
            raise ConfigError(f"engine=megatron supports {', '.join(SUPPORTED)} decoders; this model is {kind!r} "
                              "(use engine=torch)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                   groups=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   ffn=config.intermediate_size, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=kind == "qwen2" or bool(getattr(config, "attention_bias", False)),
                   qk_norm=kind == "qwen3")

    def check_parallel(self, tp: int, pp: int) -> None:
        for what, n in (("key/value heads", self.groups), ("attention heads", self.heads), ("vocab_size", self.vocab),
                        ("intermediate_size", self.ffn)):
            if n % tp:
                raise ConfigError(f"tensor_parallel={tp} must divide the model's {what} ({n})")
        if self.layers % pp:
            raise ConfigError(f"pipeline_parallel={pp} must divide the model's {self.layers} layers")


def rope_settings(config) -> dict:
    """GPTModel's RoPE arguments from the HF config; a scaling Megatron cannot reproduce is an error, not a guess."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rotary_base": float(theta)}
    llama3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind == "llama3" and all(float(params.get(k, -1)) == v for k, v in llama3.items()):
        return {"rotary_base": float(theta), "rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    raise ConfigError(f"rope scaling {params} is not supported by engine=megatron (default RoPE and Llama-3.1 "
                      "scaling with factors 1/4 and 8192 original positions are)")


def partition_dim(name: str):
    """The dimension a GPTModel parameter is split along under tensor parallelism (None: replicated)."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias",
                      "linear_fc1.weight")):
        return 0
    return None


def layer_range(shape: DecoderShape, pp: int, pp_rank: int) -> range:
    per = shape.layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def _rows(t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    return t.chunk(tp, dim=0)[r]


def _cols(t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    return t.chunk(tp, dim=1)[r]


def _qkv(q, k, v, s: DecoderShape, tp: int, r: int) -> torch.Tensor:
    """Interleave per query group, then take this rank's groups (works for weights (…, h) and biases (…,))."""
    per = s.heads // s.groups
    tail = q.shape[1:]
    grouped = torch.cat([q.reshape(s.groups, per * s.head_dim, *tail), k.reshape(s.groups, s.head_dim, *tail),
                         v.reshape(s.groups, s.head_dim, *tail)], dim=1)
    return grouped.chunk(tp, dim=0)[r].reshape(-1, *tail)


def _unqkv(shards: list[torch.Tensor], s: DecoderShape):
    per = s.heads // s.groups
    tail = shards[0].shape[1:]
    grouped = torch.cat([x.reshape(-1, (per + 2) * s.head_dim, *tail) for x in shards], dim=0)
    q, k, v = grouped.split([per * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], s: DecoderShape, tp: int = 1, tp_rank: int = 0, pp: int = 1,
                   pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """HF state dict (`model.…`, `lm_head.weight`) -> the state dict of Megatron's GPTModel on rank (tp_rank, pp_rank)."""
    out: dict[str, torch.Tensor] = {}
    first, last = pp_rank == 0, pp_rank == pp - 1
    embed = hf["model.embed_tokens.weight"]
    if s.tied and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], embed):
        # transformers then keeps the two apart (it warns and does not tie): converting as tied would change the model
        raise ConfigError("the config ties the input and output embeddings but the checkpoint's lm_head differs from "
                          "embed_tokens (transformers leaves them untied): set tie_word_embeddings=false in config.json")
    if first:
        out["embedding.word_embeddings.weight"] = _rows(embed, tp, tp_rank)
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        # tied: the last stage holds its own copy of the embedding as the output weight (Megatron syncs their grads)
        if not s.tied and "lm_head.weight" in hf:  # absent: a reward model's backbone (load_hf_state checks coverage)
            out["output_layer.weight"] = _rows(hf["lm_head.weight"], tp, tp_rank)
        elif s.tied and pp > 1:
            out["output_layer.weight"] = _rows(embed, tp, tp_rank)
    for local, i in enumerate(layer_range(s, pp, pp_rank)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        a = h + "self_attn."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"],
                                                           hf[a + "v_proj.weight"], s, tp, tp_rank)
        if s.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _qkv(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"],
                                                             hf[a + "v_proj.bias"], s, tp, tp_rank)
        if s.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = hf[a + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[a + "k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = _cols(hf[a + "o_proj.weight"], tp, tp_rank)
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([_rows(hf[h + "mlp.gate_proj.weight"], tp, tp_rank),
                                                      _rows(hf[h + "mlp.up_proj.weight"], tp, tp_rank)], dim=0)
        out[m + "mlp.linear_fc2.weight"] = _cols(hf[h + "mlp.down_proj.weight"], tp, tp_rank)
    return out


def megatron_to_hf(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], s: DecoderShape, tp: int,
                   pp: int) -> dict[str, torch.Tensor]:
    """Every rank's GPTModel state dict, keyed (pp_rank, tp_rank) -> the HF state dict (inverse of hf_to_megatron)."""
    missing = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in shards]
    if missing:
        raise ConfigError(f"megatron_to_hf: no state dict for (pp_rank, tp_rank) {missing}")
    hf: dict[str, torch.Tensor] = {}
    cat_rows = lambda p, key: torch.cat([shards[(p, t)][key] for t in range(tp)], dim=0)
    cat_cols = lambda p, key: torch.cat([shards[(p, t)][key] for t in range(tp)], dim=1)
    hf["model.embed_tokens.weight"] = cat_rows(0, "embedding.word_embeddings.weight")
    hf["model.norm.weight"] = shards[(pp - 1, 0)]["decoder.final_layernorm.weight"]
    if not s.tied and "output_layer.weight" in shards[(pp - 1, 0)]:  # a reward model's backbone has no LM head
        hf["lm_head.weight"] = cat_rows(pp - 1, "output_layer.weight")
    for p in range(pp):
        for local, i in enumerate(layer_range(s, pp, p)):
            h, m = f"model.layers.{i}.", f"decoder.layers.{local}."
            a, r0 = h + "self_attn.", shards[(p, 0)]
            hf[h + "input_layernorm.weight"] = r0[m + "input_layernorm.weight"]
            q, k, v = _unqkv([shards[(p, t)][m + "self_attention.linear_qkv.weight"] for t in range(tp)], s)
            hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"] = q, k, v
            if s.qkv_bias:
                q, k, v = _unqkv([shards[(p, t)][m + "self_attention.linear_qkv.bias"] for t in range(tp)], s)
                hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"] = q, k, v
            if s.qk_norm:
                hf[a + "q_norm.weight"] = r0[m + "self_attention.q_layernorm.weight"]
                hf[a + "k_norm.weight"] = r0[m + "self_attention.k_layernorm.weight"]
            hf[a + "o_proj.weight"] = cat_cols(p, m + "self_attention.linear_proj.weight")
            hf[h + "post_attention_layernorm.weight"] = r0[m + "pre_mlp_layernorm.weight"]
            fc1 = [shards[(p, t)][m + "mlp.linear_fc1.weight"].chunk(2, dim=0) for t in range(tp)]
            hf[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1], dim=0)
            hf[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in fc1], dim=0)
            hf[h + "mlp.down_proj.weight"] = cat_cols(p, m + "mlp.linear_fc2.weight")
    return hf
