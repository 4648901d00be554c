"""Pieces every training stage shares: the process-group lifetime, resume and resumable checkpoints.

A stage's step state is (step, epoch, next batch in the epoch): the data order is a pure function
of (seed, epoch), so these three numbers plus model, optimizer, scheduler and RNG state resume a
run exactly (tests compare weights bit for bit after kill -9).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

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


# ===== the optimizer-step loop both training stages run ==========================================
@dataclass
class StepResult:
    """What one global batch's forward/backward on this rank produced (summed over the data ranks by the loop)."""
    loss_sum: float          # Σ of the per-item losses the step's loss is the mean of (this rank's share)
    tokens: int              # non-pad tokens forwarded (this rank)
    normaliser: float        # the step loss = Σ ranks' loss_sum / normaliser (SFT: N_B trained tokens; RM: samples)
    padded: int = 0          # tokens computed, padding included (this rank; SFT's packing efficiency)
    metrics: dict = field(default_factory=dict)  # extra train/* values of this step


class StepLoop:
    """Epochs of global batches (a pure function of seed, epoch and lengths), one `train_step` per batch, then
    clip, the optimizer and LR-schedule steps, the data-parallel sums, logging, resumable checkpoints and
    periodic evaluation; resumes where a checkpoint left off. Stages supply only what a step computes.

        loop = StepLoop(cfg, info, model, optimizer, n_items=len(train), run_dir=run_dir, logger=logger, ...)
        totals = loop.run(epoch_lengths, group_by_length, train_step, evaluate=..., metrics=...)
    """

    def __init__(self, cfg: DictConfig, info: te.DistInfo, model, optimizer, *, n_items: int, run_dir: Path,
                 logger, desc: str, trainable_only: bool, strict_resume: bool, sum_over_ranks: bool = True,
                 echo: bool = True):
        import torch

        self.cfg, self.info, self.model, self.optimizer, self.logger = cfg, info, model, optimizer, logger
        self.run_dir, self.desc, self.trainable_only = run_dir, desc, trainable_only
        self.sum_over_ranks, self.echo = sum_over_ranks, echo
        self.global_batch = cfg.train.global_batch_size
        steps_per_epoch = math.ceil(n_items / self.global_batch)
        self.total_steps = (cfg.train.max_steps if cfg.train.max_steps > 0
                            else math.ceil(cfg.train.epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, te.lr_lambda(
            cfg.optim.schedule, cfg.optim.warmup_steps, self.total_steps, cfg.optim.min_lr_ratio))
        self.step, self.epoch, self.start_batch = maybe_resume(cfg.resume, run_dir, model, optimizer, self.scheduler,
                                                               strict=strict_resume)
        self.totals = {"tokens": 0, "trained": 0, "padded": 0}
        self.train_time = 0.0

    def run(self, epoch_lengths: Callable[[int], list[int]], group_by_length: bool,
            train_step: Callable[[int, int, list[int]], StepResult], *, evaluate: Optional[Callable[[int], None]] = None,
            metrics: Callable[[], dict] = dict) -> dict:
        """Train to `total_steps`. `epoch_lengths(epoch)` prepares an epoch and returns its items' lengths (what
        the batches are cut by); `train_step(step, epoch, global_batch)` runs one batch's forward and backward;
        `evaluate(step)` every `train.eval_every` steps; `metrics()` adds to every log line."""
        from tqdm.auto import tqdm

        from ..data.batching import global_batches

        cfg, info = self.cfg, self.info
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, disable=not info.is_main,
                   dynamic_ncols=True)
        t_train = time.time()
        while self.step < self.total_steps:
            batches = global_batches(epoch_lengths(self.epoch), self.global_batch, seed=cfg.seed, epoch=self.epoch,
                                     group_by_length=group_by_length)
            for b in range(self.start_batch, len(batches)):
                t0 = time.time()
                self.model.train()
                result = train_step(self.step, self.epoch, batches[b])
                grad_norm = te.clip_grad_norm(self.model, cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self._log(result, grad_norm, time.time() - t0, metrics)
                bar.update(1)
                if cfg.train.save_every > 0 and self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                    save_state(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, epoch=self.epoch,
                               next_batch=b + 1, n_batches=len(batches), info=info,
                               keep_last=cfg.train.keep_checkpoints, trainable_only=self.trainable_only)
                if (evaluate is not None and cfg.train.eval_every > 0 and self.step % cfg.train.eval_every == 0
                        and self.step < self.total_steps):
                    evaluate(self.step)
                if self.step >= self.total_steps:
                    break
            self.epoch, self.start_batch = self.epoch + 1, 0
        bar.close()
        self.train_time = time.time() - t_train
        return self.totals

    def _log(self, r: StepResult, grad_norm: float, dt: float, metrics: Callable[[], dict]) -> None:
        cfg, info = self.cfg, self.info
        sums = [r.loss_sum, r.tokens, r.padded]
        loss_total, tok_total, pad_total = te.all_reduce_sum(sums, info.device) if self.sum_over_ranks else sums
        self.totals["tokens"] += tok_total
        self.totals["trained"] += r.normaliser
        self.totals["padded"] += pad_total
        if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
            extra = ({"train/trained_tokens_per_s": r.normaliser / dt,
                      "train/packing_efficiency": tok_total / max(pad_total, 1)} if pad_total else {})
            self.logger.log({"train/loss": loss_total / r.normaliser, "train/lr": self.scheduler.get_last_lr()[0],
                             "train/grad_norm": grad_norm, "train/tokens_per_s": tok_total / dt, **extra,
                             "train/peak_mem_mb": te.peak_memory_mb(info.device), "train/epoch": self.epoch,
                             **r.metrics, **metrics()}, self.step, echo=self.echo)
