"""Pieces every training stage shares: the process-group lifetime, resume and resumable checkpoints.

A stage's step state is (step, epoch, next batch in the epoch): the data order is a pure function
of (seed, epoch), so these three numbers plus model, optimizer, scheduler and RNG state resume a
run exactly (tests compare weights bit for bit after kill -9).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .. import checkpoint as ckpt
from ..engines import torch_engine as te
from ..logging import print0


def run_distributed(stage: Callable, cfg: DictConfig) -> dict:
    """Run `stage(cfg, info, t_start)` inside the process group (torchrun) or without one."""
    t_start = time.time()
    if cfg.engine.get("strategy") == "megatron":
        from ..engines.megatron.engine import distributed as megatron_distributed

        with megatron_distributed(cfg.engine) as info:
            return stage(cfg, info, t_start)
    with te.distributed(cfg.engine.device) as info:
        return stage(cfg, info, t_start)


def prepare_run(cfg: DictConfig, info: te.DistInfo):
    """Strategy, autocast dtype and the (created) run dir of a training stage; seeds torch."""
    import torch

    strategy = te.resolve_strategy(cfg.engine.strategy, info)
    amp_dtype = te.resolve_precision(cfg.engine.precision, info.device)
    if strategy == "megatron" and amp_dtype is not None:
        # Megatron's tensor-parallel layers have their own autograd functions, which autocast does not reach (the
        # backward would mix bf16 and fp32): the model computes in its weights' dtype instead
        print0(f"engine=megatron: no autocast (engine.precision={cfg.engine.precision} ignored); computing in "
               f"model.dtype={cfg.model.dtype} (model.dtype=bfloat16 for bf16 weights and compute)")
        amp_dtype = None
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    return strategy, amp_dtype, run_dir


def maybe_resume(resume, run_dir: Path, model, optimizer, scheduler, *, strict: bool) -> tuple[int, int, int]:
    """`resume`: auto (latest checkpoint if any) | never/None | a checkpoint dir. -> (step, epoch, next batch)."""
    latest = ckpt.find_latest_checkpoint(run_dir) if resume == "auto" else (
        None if resume in (None, "never") else Path(resume))
    if latest is None:
        return 0, 0, 0
    model_state, optim_state, state = ckpt.load_training_state(latest)
    if getattr(model, "is_megatron", False):  # sharded: each rank reads its own part, or re-slices at a new split
        from ..engines.megatron.checkpoint import load_checkpoint

        load_checkpoint(latest, model, optimizer)
    else:
        te.load_full_state(model, optimizer, model_state, optim_state, strict=strict)
    scheduler.load_state_dict(state["scheduler"])
    print0(f"resumed from {latest} at step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")
    return state["step"], state["epoch"], state["batch_in_epoch"]


def save_state(run_dir: Path, step: int, model, optimizer, scheduler, *, epoch: int, next_batch: int, n_batches: int,
               info: te.DistInfo, keep_last: int, trainable_only: bool) -> None:
    """A resumable checkpoint. `trainable_only`: the frozen rest is the base model itself (LoRA, frozen backbone)."""
    if next_batch >= n_batches:
        epoch, next_batch = epoch + 1, 0
    state = {"epoch": epoch, "batch_in_epoch": next_batch, "scheduler": scheduler.state_dict()}
    if getattr(model, "is_megatron", False):  # every rank writes its own shard: nothing is gathered
        from ..engines.megatron.checkpoint import save_checkpoint

        save_checkpoint(run_dir, step, model, optimizer, state=state, keep_last=keep_last)
        return
    model_state = te.full_model_state(model)  # collective under FSDP2: every rank calls it
    if trainable_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    optim_state = te.full_optimizer_state(model, optimizer)
    if info.is_main:
        ckpt.save_training_state(run_dir, step, model_state=model_state, optimizer_state=optim_state, state=state,
                                 keep_last=keep_last)
    te.barrier()
