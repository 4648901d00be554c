"""The torch engine: one process, DDP or FSDP2 (`fully_shard`) under torchrun, on CPU or GPU.

- Process group: gloo on CPU, nccl on GPU, from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK).
- Precision: "auto" = bf16 autocast on CUDA and on CPUs with native bf16, else fp32; "bf16" / "fp32" force it. Master
  weights and AdamW state stay fp32; heads that need fp32 opt out of autocast themselves.
- Strategies: "single" (no wrapper), "ddp", "fsdp2" (each decoder layer, then the root, sharded
  over a 1-D device mesh).
- State dicts go through `torch.distributed.checkpoint.state_dict`, which returns full,
  name-keyed tensors for every strategy, so a checkpoint written under FSDP2 resumes under DDP.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

STRATEGIES = ("single", "ddp", "fsdp2")
# The group that data-parallel collectives (loss sums, gathered predictions) run over: the world, except under
# engine=megatron, where tensor-parallel ranks of one replica hold the same data (set by engines.megatron.engine).
_DATA_GROUP = None


def set_data_group(group) -> None:
    global _DATA_GROUP
    _DATA_GROUP = group


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group if torchrun launched us (and nobody started it yet); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"engine.device={device} but CUDA is not available")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto"):
    """The process group for one stage. A group that already exists (the pipeline runs several stages
    in one torchrun) is used and left running; one started here is torn down here, errors included."""
    owned = not dist.is_initialized()
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owned:
            shutdown_distributed()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_strategy(strategy: str, info: DistInfo) -> str:
    if strategy == "megatron":  # engine=megatron: its process groups are up (engines.megatron.engine.distributed)
        return strategy
    if strategy not in STRATEGIES + ("auto",):
        raise ConfigError(f"unknown engine.strategy {strategy!r}; choose one of {STRATEGIES} or auto")
    if strategy == "auto":
        return "ddp" if info.distributed else "single"
    if strategy == "single" and info.distributed:
        raise ConfigError(f"engine.strategy=single but WORLD_SIZE={info.world_size}; use ddp or fsdp2")
    return strategy


def resolve_device(device: str = "auto") -> torch.device:
    """The one device of a single-process stage: auto (the current CUDA device if any, else CPU) | cpu | cuda[:i]."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"engine.device={device} but CUDA is not available")
    if not device.startswith(("cuda", "cpu")):
        raise ConfigError(f"unknown engine.device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 / AMX). Without them bf16 is emulated: ~50x slower than fp32
    on an AVX2-only CPU (measured: 1.1 vs 56 GFLOP/s), so `auto` must not pick it there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32. auto: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise ConfigError(f"unknown engine.precision {precision!r}; choose auto, bf16 or fp32")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of an HF model (what FSDP2 shards one by one)."""
    for name in ("layers", "h", "blocks", "layer"):
        for module in model.modules():
            layers = getattr(module, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return list(layers)
    raise ValueError(f"could not find the decoder layers of {type(model).__name__} to shard")


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Move to the device and wrap for the strategy. Returns the module to call."""
    model.to(info.device)
    if strategy in ("single", "megatron"):  # megatron: TP shards are in the model; DP grads sync in grad_sync_context
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(strategy)


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters after a forward without backward (eval, probes).

    The root module keeps its parameters unsharded after forward (it expects the backward);
    without a backward they stay so, and the next training step would run on the stale
    unsharded copy instead of the optimizer-updated shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def grad_sync_context(model: nn.Module, strategy: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if strategy == "ddp" and not sync:
        return model.no_sync()
    if strategy == "fsdp2":
        model.set_requires_gradient_sync(sync)
    if strategy == "megatron" and sync:
        return _sync_megatron_grads_after(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _sync_megatron_grads_after(model: nn.Module):
    """engine=megatron: TP partial sums and the data-parallel average after the step's last backward (the
    model's own `finish_grads`, engines.megatron.model.MegatronWrapper)."""
    yield
    model.finish_grads()


def build_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float = 1e-8, *, distributed: bool = False) -> torch.optim.Optimizer:
    """AdamW; `distributed` (engine=megatron): fp32 master weights, state sharded over the DP replicas."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    # no weight decay on biases and norms (1-D tensors), as usual for transformers
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if distributed:
        from .megatron.optimizer import DistributedAdamW

        return DistributedAdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Multiplier on the peak LR at a step: linear warmup, then constant or cosine to min_lr."""
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"unknown optim.schedule {schedule!r}; choose constant or cosine")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    if getattr(model, "is_megatron", False):  # TP shards: the norm needs every rank's part (MegatronWrapper's own)
        return model.clip_grad_norm(max_norm)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_DATA_GROUP)
    return t.tolist()


def all_gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(_DATA_GROUP)
    dist.all_gather_object(out, obj, group=_DATA_GROUP)
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak RSS on CPU (since the last reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # Linux: VmHWM, which reset_peak_memory can lower (ru_maxrss never goes down)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (the pipeline runs several stages in one process)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # glibc keeps freed heap pages mapped (they would count as the next stage's RSS) unless trimmed
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the peak RSS to the current RSS (proc(5), /proc/pid/clear_refs)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


# ----------------------------------------------------------------------------- state dicts
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    if getattr(model, "is_megatron", False):  # gathered and converted to HF names on global rank 0 ({} elsewhere)
        return model.full_state()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    model_state: dict, optimizer_state: Optional[dict], strict: bool = True) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)
