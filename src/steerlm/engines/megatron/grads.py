"""engine=megatron's gradient step: sync after the last backward (what DDP's hooks and megatron-core's
finalize_model_grads do) and the global norm clip over tensor-parallel shards.

Imports neither the stage models nor the engine module, so both can call it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def finish_grads(model: torch.nn.Module) -> None:
    """After the step's last backward, what DDP's hooks and Megatron's finalize_model_grads do: tied embedding
    copies summed across the first and last stage, partial gradients summed over the TP group, and the
    data-parallel average. `model`: a stage wrapper (its GPTModel in `.gpt`) or a GPTModel."""
    sync_tied_embedding_grads(getattr(model, "gpt", model))
    sync_tensor_parallel_partial_grads(model)
    sync_data_parallel_grads(model)


def _all_reduce_in_buckets(grads: list[torch.Tensor], group, scale: float = 1.0,
                           bucket_elements: int = 2 ** 26) -> None:
    """Sum `grads` over `group` (then multiply by `scale`) in flat buckets of one dtype: few collectives, and at
    most one bucket (64 Mi elements) of extra memory rather than a copy of every gradient."""

    def flush(bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat *= scale
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
        bucket, n = [], 0
        for g in (g for g in grads if g.dtype == dtype):
            bucket.append(g)
            n += g.numel()
            if n >= bucket_elements:
                flush(bucket)
                bucket, n = [], 0
        if bucket:
            flush(bucket)


def sync_data_parallel_grads(model: torch.nn.Module) -> None:
    """Average gradients over the data-parallel replicas (what DDP does)."""
    from megatron.core import parallel_state as ps

    size = ps.get_data_parallel_world_size()
    if size > 1:
        _all_reduce_in_buckets([p.grad for p in model.parameters() if p.grad is not None],
                               ps.get_data_parallel_group(), scale=1.0 / size)


def sync_tensor_parallel_partial_grads(model: torch.nn.Module) -> None:
    """Sum the gradients of replicated weights that each TP rank sees only part of (`tp_partial_grad`, set by
    build_gpt: q/k norms, and every norm under sequence parallelism), so the TP copies stay equal."""
    from megatron.core import parallel_state as ps

    grads = [p.grad for p in model.parameters() if p.grad is not None and getattr(p, "tp_partial_grad", False)]
    if grads and ps.get_tensor_model_parallel_world_size() > 1:
        _all_reduce_in_buckets(grads, ps.get_tensor_model_parallel_group())


def sync_tied_embedding_grads(gpt) -> None:
    """PP > 1 with tied embeddings: the first stage's embedding and the last stage's output layer are one HF
    weight held twice; summing their gradients keeps the copies equal (Megatron's finalize_model_grads does this)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1 or not gpt.share_embeddings_and_output_weights:
        return
    if ps.is_rank_in_embedding_group():
        weight = gpt.shared_embedding_or_output_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def _counted_here(model: torch.nn.Module):
    """-> p -> whether this rank counts parameter p once in a model-wide sum: a TP-split tensor on every TP rank,
    a replicated one on TP rank 0, and a copy another pipeline stage holds (a tied output layer, the RM head)
    not at all."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    gpt = getattr(model, "gpt", None)
    elsewhere = set()  # ids
    if gpt is not None and ps.get_pipeline_model_parallel_world_size() > 1:
        if gpt.share_embeddings_and_output_weights and gpt.post_process and not gpt.pre_process:
            elsewhere.add(id(gpt.output_layer.weight))  # tied: the first stage's embedding counts
        if not gpt.post_process:  # the RM head, on every stage (a frozen backbone trains each copy alike)
            elsewhere |= {id(p) for p in model.extra_params().values()}
    return lambda p: id(p) not in elsewhere and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)


def trainable_parameters(model: torch.nn.Module) -> int:
    """The number of trainable parameters of the whole model (every TP shard and PP stage); collective."""
    from megatron.core import parallel_state as ps

    here = _counted_here(model)
    n = torch.tensor([float(sum(p.numel() for p in model.parameters() if p.requires_grad and here(p)))],
                     dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(n, group=ps.get_model_parallel_group())
    return int(n.item())


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """The global gradient norm over every shard (a TP-split tensor counts on every TP rank, a replicated one once),
    then clip; max_norm <= 0 only measures."""
    from megatron.core import parallel_state as ps

    total = torch.zeros((), dtype=torch.float64)
    here = _counted_here(model)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        if here(p):
            total += p.grad.detach().double().pow(2).sum().cpu()
    total = total.to(grads[0].device if grads else "cpu")
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm
