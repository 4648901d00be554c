"""LoRA on Megatron's tensor-parallel linears (engine=megatron SFT), exported as a peft adapter of the HF model.

W x + (α/r)·B·A·x on every linear of every layer (peft's "all-linear", without the LM head). Megatron fuses
q/k/v into `linear_qkv` and gate/up into `linear_fc1`, so q, k and v share one A (and gate and up): the update
of the fused matrix is one rank-r product. The export writes peft's per-projection layout (the shared A
copied to each), which is the same function.

Under tensor parallelism, B·A follows the split of W (Hu et al. 2021; the layout of NeMo's parallel adapters):

    column-parallel W (rows split: qkv, fc1)   A: r × in, replicated     B: out/TP × r, split like W
        x is every rank's full input; h = A x, Δy_local = B_local h. Each rank's ∂A is a partial sum
        (its B_local's share): summed over TP in engine.finish_grads (`tp_partial_grad`).
    row-parallel W (columns split: proj, fc2)  A: r × in/TP, split like W   B: out × r, replicated
        h = Σ_TP A_local x_local (an all-reduce of r numbers per token), Δy = B h.

Sequence parallelism: a column layer's input is this rank's sequence shard, gathered for A (the backward
reduce-scatters); a row layer reduce-scatters h instead of all-reducing it, and B's gradient is then a
partial sum over the sequence shards.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ...errors import ConfigError
from .convert import DecoderShape, _cols, _qkv, _rows, _unqkv, layer_range

COLUMN = ("self_attention.linear_qkv", "mlp.linear_fc1")
ROW = ("self_attention.linear_proj", "mlp.linear_fc2")
# HF projection names -> the Megatron linear they live in (a fused linear needs all of its projections)
HF_TARGETS = {"q_proj": "self_attention.linear_qkv", "k_proj": "self_attention.linear_qkv",
              "v_proj": "self_attention.linear_qkv", "o_proj": "self_attention.linear_proj",
              "gate_proj": "mlp.linear_fc1", "up_proj": "mlp.linear_fc1", "down_proj": "mlp.linear_fc2"}


def megatron_targets(target_modules) -> list[str]:
    """peft's `target_modules` ("all-linear" or HF projection names) -> Megatron linears; a fused linear is
    adapted whole, so its projections must be named together."""
    if target_modules in ("all-linear", None):
        return [*COLUMN, *ROW]
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [n for n in names if n not in HF_TARGETS]
    if unknown:
        raise ConfigError(f"engine=megatron LoRA: target_modules {unknown} are not decoder projections "
                          f"({', '.join(HF_TARGETS)}; the LM head is not supported)")
    targets = sorted({HF_TARGETS[n] for n in names})
    for t in targets:
        need = sorted(n for n, m in HF_TARGETS.items() if m == t)
        if not set(need) <= set(names):
            raise ConfigError(f"engine=megatron LoRA: Megatron fuses {'/'.join(need)} into one linear, so adapt them "
                              f"together: target_modules must name all of {need} (or use all-linear)")
    return targets


def _linears(gpt, targets: list[str]):
    for local, layer in enumerate(gpt.decoder.layers):
        for t in targets:
            yield f"decoder.layers.{local}.{t}", layer.get_submodule(t), t in COLUMN


def apply_lora(gpt, *, r: int, alpha: float, targets: list[str], seed: int = 0) -> int:
    """Freeze the GPTModel and add A (kaiming-uniform, as peft) and B (zeros) to each target linear of this stage.
    A is drawn on its full shape from (seed, layer, linear) and then sliced, so every TP x PP split starts from the
    same adapter. -> the number of LoRA parameters on this rank."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    first = layer_range(gpt.hf_shape, ps.get_pipeline_model_parallel_world_size(),
                        ps.get_pipeline_model_parallel_rank()).start
    sp = gpt.config.sequence_parallel
    for p in gpt.parameters():
        p.requires_grad_(False)
    n = 0
    for name, linear, column in _linears(gpt, targets):
        w = linear.weight
        out_full, in_full = (w.shape[0] * tp, w.shape[1]) if column else (w.shape[0], w.shape[1] * tp)
        layer = first + int(name.split(".")[2])
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 101 + (COLUMN + ROW).index(name.split(".", 3)[3]))
        a_full = torch.empty(r, in_full)
        bound = 1 / math.sqrt(in_full)  # kaiming_uniform_(a=√5) on (r, in): U(−1/√in, 1/√in), as peft's lora_A
        a_full.uniform_(-bound, bound, generator=g)
        a = a_full if column else _cols(a_full, tp, tp_rank)
        b = torch.zeros(out_full // tp if column else out_full, r)
        linear.lora_A = torch.nn.Parameter(a.to(device=w.device, dtype=w.dtype).contiguous())
        linear.lora_B = torch.nn.Parameter(b.to(device=w.device, dtype=w.dtype))
        A, B = linear.lora_A, linear.lora_B
        # the layout tags engine.clip_grad_norm and engine.finish_grads read
        A.tensor_model_parallel, A.partition_dim, A.partition_stride = not column, 1, 1
        B.tensor_model_parallel, B.partition_dim, B.partition_stride = column, 0, 1
        A.tp_partial_grad = column and tp > 1
        B.tp_partial_grad = (not column) and sp and tp > 1
        A.sequence_parallel = B.sequence_parallel = False
        linear.lora_scale = alpha / r
        linear.register_forward_hook(_column_delta if column else _row_delta)
        n += A.numel() + B.numel()
    return n


def _column_delta(linear, args, output):
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    x = args[0]
    # the LoRA branch sees the full input, and its input gradient is summed over the TP ranks' B shares
    x = gather_from_sequence_parallel_region(x) if linear.sequence_parallel else copy_to_tensor_model_parallel_region(x)
    delta = (x @ linear.lora_A.t()) @ linear.lora_B.t() * linear.lora_scale
    return (output[0] + delta, *output[1:])


def _row_delta(linear, args, output):
    from megatron.core.tensor_parallel import (reduce_from_tensor_model_parallel_region,
                                               reduce_scatter_to_sequence_parallel_region)

    h = args[0] @ linear.lora_A.t()  # (S, B, r): this rank's share of A x
    h = reduce_scatter_to_sequence_parallel_region(h) if linear.sequence_parallel \
        else reduce_from_tensor_model_parallel_region(h)
    return (output[0] + (h @ linear.lora_B.t()) * linear.lora_scale, *output[1:])


# ----------------------------------------------------------------------------- HF (peft) layout
def lora_to_hf(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], s: DecoderShape, tp: int,
               pp: int) -> dict[str, torch.Tensor]:
    """Every rank's LoRA tensors, keyed (pp_rank, tp_rank) -> peft's names without the adapter name
    (`model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...); the fused linears' shared A is copied."""
    hf: dict[str, torch.Tensor] = {}
    for p in range(pp):
        for local, i in enumerate(layer_range(s, pp, p)):
            m, h = f"decoder.layers.{local}.", f"model.layers.{i}."
            r0 = shards[(p, 0)]
            if m + "self_attention.linear_qkv.lora_A" in r0:
                a = r0[m + "self_attention.linear_qkv.lora_A"]
                bq, bk, bv = _unqkv([shards[(p, t)][m + "self_attention.linear_qkv.lora_B"] for t in range(tp)], s)
                for proj, b in (("q_proj", bq), ("k_proj", bk), ("v_proj", bv)):
                    hf[f"{h}self_attn.{proj}.lora_A.weight"], hf[f"{h}self_attn.{proj}.lora_B.weight"] = a.clone(), b
            if m + "mlp.linear_fc1.lora_A" in r0:
                a = r0[m + "mlp.linear_fc1.lora_A"]
                halves = [shards[(p, t)][m + "mlp.linear_fc1.lora_B"].chunk(2, dim=0) for t in range(tp)]
                for proj, j in (("gate_proj", 0), ("up_proj", 1)):
                    hf[f"{h}mlp.{proj}.lora_A.weight"] = a.clone()
                    hf[f"{h}mlp.{proj}.lora_B.weight"] = torch.cat([x[j] for x in halves], dim=0)
            for linear, hf_name in (("self_attention.linear_proj", "self_attn.o_proj"), ("mlp.linear_fc2", "mlp.down_proj")):
                if m + linear + ".lora_A" in r0:
                    hf[f"{h}{hf_name}.lora_A.weight"] = torch.cat([shards[(p, t)][m + linear + ".lora_A"]
                                                                   for t in range(tp)], dim=1)
                    hf[f"{h}{hf_name}.lora_B.weight"] = r0[m + linear + ".lora_B"]
    return hf


def lora_from_hf(hf: Mapping[str, torch.Tensor], s: DecoderShape, tp: int, tp_rank: int, pp: int,
                 pp_rank: int) -> dict[str, torch.Tensor]:
    """Inverse of `lora_to_hf` for one rank (q/k/v and gate/up must share their A, as `lora_to_hf` writes)."""
    out: dict[str, torch.Tensor] = {}
    for local, i in enumerate(layer_range(s, pp, pp_rank)):
        m, h = f"decoder.layers.{local}.", f"model.layers.{i}."
        A = lambda proj: hf[f"{h}{proj}.lora_A.weight"]
        B = lambda proj: hf[f"{h}{proj}.lora_B.weight"]
        if f"{h}self_attn.q_proj.lora_A.weight" in hf:
            _same_a([A("self_attn.q_proj"), A("self_attn.k_proj"), A("self_attn.v_proj")], f"{h}self_attn q/k/v")
            out[m + "self_attention.linear_qkv.lora_A"] = A("self_attn.q_proj")
            out[m + "self_attention.linear_qkv.lora_B"] = _qkv(B("self_attn.q_proj"), B("self_attn.k_proj"),
                                                               B("self_attn.v_proj"), s, tp, tp_rank)
        if f"{h}mlp.gate_proj.lora_A.weight" in hf:
            _same_a([A("mlp.gate_proj"), A("mlp.up_proj")], f"{h}mlp gate/up")
            out[m + "mlp.linear_fc1.lora_A"] = A("mlp.gate_proj")
            out[m + "mlp.linear_fc1.lora_B"] = torch.cat([_rows(B("mlp.gate_proj"), tp, tp_rank),
                                                          _rows(B("mlp.up_proj"), tp, tp_rank)], dim=0)
        for linear, hf_name in (("self_attention.linear_proj", "self_attn.o_proj"), ("mlp.linear_fc2", "mlp.down_proj")):
            if f"{h}{hf_name}.lora_A.weight" in hf:
                out[m + linear + ".lora_A"] = _cols(A(hf_name), tp, tp_rank)
                out[m + linear + ".lora_B"] = B(hf_name)
    return out


def _same_a(tensors: list[torch.Tensor], where: str) -> None:
    if not all(torch.equal(tensors[0], t) for t in tensors[1:]):
        raise ConfigError(f"engine=megatron LoRA: {where} have different lora_A; Megatron's fused linear needs one")
