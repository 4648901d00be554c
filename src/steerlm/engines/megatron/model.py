"""Megatron-core GPTModel from an HF decoder: build, load HF weights, forward, gather back to HF.

Process groups come from `megatron.core.parallel_state` (initialised by `init_parallel`), launched with torchrun:
each rank holds 1/TP of every matrix and 1/PP of the layers. The model uses Megatron's local layer spec
(plain PyTorch attention and norms): transformer_engine is optional and not needed to run.

Sequences are right-padded and attention is causal only, so every real token sees only real tokens; the RM
reads the last real token and SFT's loss mask excludes the padding. Packed rows (several sequences per row,
`position_ids` restarting at 0 for each) get a block-diagonal causal mask instead, so no token sees another
sequence. Megatron's RoPE rotates by the row position (0..S-1) whatever `position_ids` say, and that is exact:
RoPE scores depend only on the distance i − j between query and key, which is the same within a sequence
whether it starts at 0 or at its offset in the row.

Sequence parallelism (`sequence_parallel=True`, TP > 1) splits the activations outside the attention and MLP
matmuls along the sequence over the TP ranks (Korthikanti et al. 2022): the norms run on 1/TP of the tokens, so
their weights' gradients are per-rank partial sums (tagged here, summed in `engine.finish_grads`), and rows are
padded to a multiple of TP.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from .convert import DecoderShape, hf_to_megatron, layer_range, megatron_to_hf, partition_dim, rope_settings


def _mcore():
    try:
        from megatron.core import parallel_state, tensor_parallel  # noqa: F401
    except ImportError as e:  # the optional extra
        raise ConfigError(f"engine=megatron needs megatron-core: pip install -e '.[megatron]' ({e})") from None
    import megatron.core as mcore
    return mcore


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> dict:
    """torch.distributed (env from torchrun; nccl on GPU, gloo on CPU) + Megatron's TP/PP/DP groups -> ranks."""
    mcore = _mcore()
    ps = mcore.parallel_state
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a single process: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(backend)
    world = torch.distributed.get_world_size()
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not a multiple of tensor_parallel {tp} x pipeline_parallel {pp}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    mcore.tensor_parallel.model_parallel_cuda_manual_seed(seed)  # attention's RNG tracker needs its state
    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(), "tp": tp, "pp": pp}


def transformer_config(hf_config, *, tp: int, pp: int, sequence_parallel: bool = False,
                       recompute: bool = False, dtype: torch.dtype = torch.float32):
    """Megatron's TransformerConfig for an HF Llama-family config. Fusions off: they need CUDA kernels (TE/apex)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = DecoderShape.from_hf(hf_config)
    s.check_parallel(tp, pp)
    if sequence_parallel and tp == 1:
        sequence_parallel = False  # nothing to split
    return TransformerConfig(
        num_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads, num_query_groups=s.groups,
        kv_channels=s.head_dim, ffn_hidden_size=s.ffn, normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=s.qkv_bias,
        qk_layernorm=s.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        use_cpu_initialization=True, perform_initialization=False,  # the weights come from the HF checkpoint
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        # recompute: keep only each layer's input and rerun the layer in backward (gradient checkpointing)
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}),
        calculate_per_token_loss=True)  # the loss function divides by the global batch's token count itself


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built from Megatron's norm arguments. Megatron's own torch-norm wrapper refuses sequence
    parallelism, but RMSNorm is per token, so it runs unchanged on a sequence shard (Megatron's TE/apex norms
    differ only in the kernel)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


def build_gpt(hf_config, *, tp: int = 1, pp: int = 1, sequence_parallel: bool = False, recompute: bool = False,
              dtype: torch.dtype = torch.float32):
    """The GPTModel stage of this rank (uninitialised weights: call `load_hf_state`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    s = DecoderShape.from_hf(hf_config)
    cfg = transformer_config(hf_config, tp=tp, pp=pp, sequence_parallel=sequence_parallel, recompute=recompute,
                             dtype=dtype)
    layer = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=s.qk_norm)  # plain PyTorch attention
    layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RMSNorm
    if s.qk_norm:
        layer.submodules.self_attention.submodules.q_layernorm = RMSNorm
        layer.submodules.self_attention.submodules.k_layernorm = RMSNorm
    spec = TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(cfg), layer_norm=RMSNorm)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=s.vocab,
                     max_sequence_length=hf_config.max_position_embeddings, position_embedding_type="rope",
                     share_embeddings_and_output_weights=s.tied, parallel_output=True,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     **rope_settings(hf_config))
    # Megatron tags TP-split parameters only when it initialises them itself (perform_initialization=True); the
    # gradient norm over shards (engine.clip_grad_norm) needs the tags, so set them from the layout
    for name, p in model.named_parameters():
        if not hasattr(p, "tensor_model_parallel"):
            dim = partition_dim(name)
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = dim is not None, -1 if dim is None else dim, 1
        # replicated weights whose gradient each TP rank sees only part of: q/k norms are shared by all heads and
        # a rank holds 1/TP of the heads; under sequence parallelism every norm sees 1/TP of the tokens. The true
        # gradient is the sum over the TP group (engine.finish_grads; Megatron's finalize_model_grads does the same)
        qk, norm = "q_layernorm" in name or "k_layernorm" in name, name.endswith("layernorm.weight")
        p.tp_partial_grad = tp > 1 and (qk or (cfg.sequence_parallel and norm))
        p.sequence_parallel = cfg.sequence_parallel and norm and not qk  # q/k norms run after the all-gather
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.hf_shape, model.hf_config = s, hf_config
    return model


def load_hf_state(model, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slices of an HF state dict into the model; every parameter must be covered, exactly."""
    from megatron.core import parallel_state as ps

    s, tp, pp = model.hf_shape, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    mine = hf_to_megatron(hf_state, s, tp, ps.get_tensor_model_parallel_rank(), pp, ps.get_pipeline_model_parallel_rank())
    if isinstance(getattr(model, "output_layer", None), HiddenStates):
        mine.pop("output_layer.weight", None)  # a reward model has no LM head
    own = _tensors(model)
    if own.keys() != mine.keys():
        raise ConfigError(f"HF -> Megatron mapping mismatch: missing {sorted(own.keys() - mine.keys())[:5]}, "
                          f"unexpected {sorted(mine.keys() - own.keys())[:5]}")
    with torch.no_grad():
        for k, t in own.items():
            if t.shape != mine[k].shape:
                raise ConfigError(f"HF -> Megatron: {k} is {tuple(mine[k].shape)}, the model expects {tuple(t.shape)}")
            t.copy_(mine[k])


def _tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights (Megatron's state dict also holds `_extra_state` entries: not weights)."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")}


def local_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in _tensors(model).items()}


def gather_shards(model, keep=lambda name: True) -> Optional[dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """Every (PP, TP) rank's tensors named `keep` -> {(pp_rank, tp_rank): {name: CPU tensor}} on global rank 0
    (None elsewhere); collective. Data-parallel replicas are identical: replica 0 sends."""
    from megatron.core import parallel_state as ps

    key = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    mine = (key, {k: v.detach().cpu() for k, v in _tensors(model).items() if keep(k)}) \
        if ps.get_data_parallel_rank() == 0 else None
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    return None if gathered is None else dict(x for x in gathered if x is not None)


def gather_hf_state(model) -> Optional[dict[str, torch.Tensor]]:
    """Every rank's shards -> the HF state dict on global rank 0 (None elsewhere). Holds the full model in rank 0's
    CPU memory: the export of the final model (2 bytes per parameter in bf16); resumable checkpoints are written
    per rank instead (checkpoint.py). LoRA tensors are not weights of the HF model (causal_lm exports them)."""
    from megatron.core import parallel_state as ps

    shards = gather_shards(model, keep=lambda name: ".lora_" not in name)
    if shards is None:
        return None
    return megatron_to_hf(shards, model.hf_shape, ps.get_tensor_model_parallel_world_size(),
                          ps.get_pipeline_model_parallel_world_size())


def export_hf(model, out_dir, *, tokenizer=None, schema=None, extra_json=None, dtype=None):
    """Gather the shards and write an HF checkpoint (`save_pretrained`, safetensors) that transformers loads without
    steerlm; rank 0 writes, atomically. -> the directory on rank 0, None elsewhere."""
    from transformers import AutoModelForCausalLM

    from ...checkpoint import save_hf_model

    state = gather_hf_state(model)
    if state is None:
        return None
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(model.hf_config)
    expected = set(hf_model.state_dict()) - ({"lm_head.weight"} if model.hf_shape.tied else set())
    if set(state) != expected:
        raise ConfigError(f"Megatron -> HF: keys differ from {type(hf_model).__name__}: missing "
                          f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return save_hf_model(hf_model, state, out_dir, tokenizer=tokenizer, schema=schema, extra_json=extra_json)


class MegatronWrapper(torch.nn.Module):
    """Base of the stage models: `is_megatron` routes the torch engine's helpers here, and the source HF model is
    kept as a weightless skeleton (config and class for save_pretrained at export), held outside the module tree
    so .to(device) and .parameters() never see it."""
    is_megatron = True

    def keep_skeleton(self, hf_model) -> None:
        self._skeleton = (hf_model.to("meta"),)

    @property
    def hf_model(self):
        return self._skeleton[0]

    @property
    def config(self):
        return self.hf_model.config

    def extra_params(self) -> dict[str, torch.nn.Parameter]:
        """Parameters outside the GPTModel (the RM head), by name: checkpoint.py saves them with the shards."""
        return {}

    def full_state(self) -> dict[str, torch.Tensor]:
        """The HF state dict on global rank 0 ({} elsewhere); collective."""
        return gather_hf_state(self.gpt) or {}

    # the torch engine's step calls these on a model that shards itself (it never imports this package)
    def finish_grads(self) -> None:
        """After the step's last backward: tied-embedding, tensor-parallel and data-parallel gradient sums."""
        from .grads import finish_grads

        finish_grads(self)

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm over every shard, then clip (max_norm <= 0 only measures)."""
        from .grads import clip_grad_norm

        return clip_grad_norm(self, max_norm)


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) position ids that restart at 0 for each packed sequence -> (B, 1, S, S) bool, True where attention is
    blocked (Megatron's convention): token i sees token j iff j ≤ i and both lie in the same sequence."""
    seq = (position_ids == 0).cumsum(-1)  # which sequence of its row each token belongs to
    S = position_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()
    return ~((seq[:, :, None] == seq[:, None, :]) & causal)[:, None]


def sequence_multiple(model) -> int:
    """Rows must be a multiple of this long: TP under sequence parallelism (the sequence is split over TP ranks)."""
    return model.config.tensor_model_parallel_size if model.config.sequence_parallel else 1


def gpt_forward(model, input_ids: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, gather: bool = False) -> torch.Tensor:
    """One single-stage (PP = 1) forward of right-padded (B, S) rows -> (B, S, ...) outputs: per-token −log p(labels)
    with `labels` (Megatron's vocab-parallel cross entropy: no full-vocab gather), else logits of this rank's
    vocabulary shard ((B, S, V) with gather=True), or hidden states for a model made by `as_hidden_state_model`.
    `position_ids` (packed rows) switch the causal mask to the block-diagonal one. Rows are padded to a multiple
    of `sequence_multiple` here and the outputs cut back."""
    S = input_ids.shape[1]
    extra = -S % sequence_multiple(model)
    pad = lambda t: None if t is None else F.pad(t, (0, extra))
    input_ids, labels, position_ids = pad(input_ids), pad(labels), pad(position_ids)
    mask = None if position_ids is None else packed_attention_mask(position_ids)
    out = model(input_ids=input_ids, position_ids=position_ids_for(input_ids) if position_ids is None else position_ids,
                attention_mask=mask, labels=labels, runtime_gather_output=gather)
    return out[:, :S]


def forward_logits(model, input_ids: torch.Tensor, gather: bool = False) -> torch.Tensor:
    """(B, S) ids -> (B, S, V/TP) logits of this rank's vocabulary shard ((B, S, V) with gather=True)."""
    return gpt_forward(model, input_ids, gather=gather)


def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor,
              position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token −log p(labels) (B, S) with Megatron's vocab-parallel cross entropy (no full-vocab gather)."""
    return gpt_forward(model, input_ids, labels=labels, position_ids=position_ids)


class HiddenStates(torch.nn.Module):
    """Stands in for GPTModel.output_layer so the model returns final-norm hidden states (B, S, H), as a reward
    model needs: no vocabulary-sized projection is computed. Sequence-parallel shards are gathered first."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
            # every TP rank then computes the same loss with the replicated head, so the backward takes this
            # rank's slice of the (identical) gradient; the default reduce-scatter would sum TP copies of it
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden, None


def as_hidden_state_model(model):
    """Drop the LM head (untied: its weights are freed) and return hidden states from forward."""
    model.output_layer = HiddenStates(model.config.sequence_parallel)
    model.share_embeddings_and_output_weights = False
    return model


def pipeline_forward_backward(model, microbatches: list[dict], loss_fn, *, forward_only: bool = False) -> list[float]:
    """Megatron's 1F1B schedule over `microbatches` (dicts holding `input_ids` (B, S), optional `labels` and
    `position_ids` (packed rows), and what `loss_fn` reads). On the last stage `loss_fn(output, mb)` -> (the loss its backward sees, a value to report).
    Gradients accumulate in .grad. -> each micro-batch's reported value, on every rank of the pipeline.

    Activations travel between stages at one fixed shape, so every (B, S) tensor is right-padded with zeros to the
    largest rows and length here; `mb["rows"]` keeps the micro-batch's own row count. Padding sits after the real
    tokens of causal rows, and padded rows are for `loss_fn` to leave out."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B = max(mb["input_ids"].shape[0] for mb in microbatches)
    S = max(mb["input_ids"].shape[1] for mb in microbatches)
    S += -S % sequence_multiple(model)
    pad = lambda t: torch.nn.functional.pad(t, (0, S - t.shape[1], 0, B - t.shape[0]))
    padded = [{**{k: pad(v) if torch.is_tensor(v) and v.shape == mb["input_ids"].shape else v for k, v in mb.items()},
               "rows": mb["input_ids"].shape[0]} for mb in microbatches]

    def loss_with_report(output, mb):
        loss, value = loss_fn(output, mb)
        # calculate_per_token_loss=True: the schedule neither divides by this count nor by the micro-batch count
        return loss, torch.tensor(1, dtype=torch.int), {"value": value.detach()}

    def step(data_iterator, model):
        mb = next(data_iterator)
        packed = mb.get("position_ids")  # packed rows: block-diagonal attention (padding: position 0, alone)
        out = model(input_ids=mb["input_ids"], labels=mb.get("labels"),
                    position_ids=position_ids_for(mb["input_ids"]) if packed is None else packed,
                    attention_mask=None if packed is None else packed_attention_mask(packed))
        return out, lambda output: loss_with_report(output, mb)

    logs = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(padded), model=[model],
                                       num_microbatches=len(padded), seq_length=S, micro_batch_size=B,
                                       forward_only=forward_only)
    values = torch.tensor([float(x["value"]) for x in logs] if logs else [0.0] * len(padded), dtype=torch.float64,
                          device=microbatches[0]["input_ids"].device)
    torch.distributed.all_reduce(values, group=ps.get_pipeline_model_parallel_group())  # only the last stage had them
    return values.tolist()


__all__ = ["MegatronWrapper", "pipeline_forward_backward", "export_hf", "init_parallel", "transformer_config",
           "build_gpt", "load_hf_state", "gather_shards", "gather_hf_state", "local_state", "gpt_forward", "forward_logits", "token_nll",
           "packed_attention_mask",
           "as_hidden_state_model", "layer_range"]
