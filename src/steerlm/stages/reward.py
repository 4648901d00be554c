"""Stage 1: train the multi-attribute regression reward model (or its Bradley-Terry fine-tune).

Reads top to bottom: set up (process group, schema, tokenizer, data, model, optimizer), train,
evaluate, export. Features and the config keys that control them:

- Objective (`loss.type`): `mse` = masked MSE over the attributes each rated turn annotates
  (`losses.masked_mse`); `bt`, `margin_bt`, `scaled_bt` = Bradley-Terry variants on preference
  pairs (`data.pairs`) scored by `loss.pair_weights` · attributes. Start a BT run from a stage-1
  RM by pointing `model.path` at it (HelpSteer2-Preference's regression -> scaled-BT recipe).
- Backbone (`model.freeze_backbone`): false trains everything; true trains only the fp32 head on
  last-token features computed once (sharded over ranks) and cached in `run_dir/cache/` — the
  fast option for CPUs and for probing a large backbone. Both save the same HF model.
- Data (`data.train`, `data.pairs`, `eval.val_fraction`): canonical conversations from any
  loader; held-out split by conversation group (tree / prompt), never by row. Over-length inputs
  (`max_length`, `over_length`): error, or skip and count. Never truncated.
- Engine (`engine.strategy`, `engine.precision`): single / DDP / FSDP2 under torchrun, bf16
  autocast on GPU. Loss is reduced by the global batch size, so any world size and micro-batch
  split gives the same step. `train.group_by_length` keeps padding small.
- Checkpoints (`train.save_every`, `resume`): atomic training state; `resume=auto` continues
  from the latest one with identical results. The final model is HF-native in `run_dir/model`.
- Evaluation (`eval.*`): per-attribute MSE/MAE/Pearson/Spearman vs the train-mean baseline and
  pairwise accuracy under `eval.pair_weights`; JSON + table.

Raises:
    SchemaMismatchError: `model.path` is an RM with a different attribute schema.
    DataError: bad input rows, or an over-length sample under `over_length=error`.
    ConfigError: a pair loss without `data.pairs`; freeze_backbone with fsdp2; unknown options.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import checkpoint as ckpt
from ..attributes import get_schema, weights_vector
from ..data.batching import micro_batches, pad_token_batch, rank_slice
from ..data.sources import load_mixture, load_preference_pairs
from ..data.split import split_by_group
from ..engines import torch_engine as te
from ..errors import ConfigError, DataError
from ..length_order import LengthOrder
from ..logging import MetricLogger, print0
from ..losses import PAIR_LOSSES, bradley_terry, masked_mse, scalarize
from ..metrics import beats_baseline, format_table, pairwise_accuracy, regression_metrics
from ..models.reward_model import check_checkpoint_schema, load_reward_model, load_tokenizer
from .training import StepLoop, StepResult, prepare_run, run_distributed
from . import reward_data as rd
from ..scoring import RM_CARD
from .reward_forward import FeatureCache, RewardForward


def run(cfg: DictConfig) -> dict:
    return run_distributed(_run, cfg)


def _run(cfg: DictConfig, info: te.DistInfo, t_start: float) -> dict:
    rs = setup(cfg, info)
    loop = StepLoop(cfg, info, rs.model, rs.optimizer, n_items=len(rs.train_items), run_dir=rs.run_dir,
                    logger=rs.logger, desc="reward", trainable_only=rs.frozen, strict_resume=not rs.frozen,
                    sum_over_ranks=not rs.frozen, echo=not rs.frozen)
    print0(f"reward: {len(rs.train_items)} train {'pairs' if rs.pair_objective else 'samples'}, "
           f"{len(rs.data['val'])} val samples, {loop.total_steps} steps of {loop.global_batch}, "
           f"strategy={rs.strategy}, world={info.world_size}, frozen_backbone={rs.frozen}")
    lengths = [len(x["input_ids"]) if "input_ids" in x else len(x["chosen_ids"]) + len(x["rejected_ids"])
               for x in rs.train_items]

    def evaluate_now(step: int) -> None:
        rs.logger.log(flatten_eval(evaluate(rs.forward, rs.data, rs.schema, cfg, rs.order)), step)
        te.reshard(rs.model)  # FSDP2: drop the unsharded copy the eval forward left behind

    totals = loop.run(lambda epoch: lengths, cfg.train.group_by_length,
                      lambda step, epoch, gb: train_step(rs, cfg, info, step, gb), evaluate=evaluate_now)
    results = evaluate(rs.forward, rs.data, rs.schema, cfg, rs.order)
    rs.logger.log(flatten_eval(results), loop.step, echo=False)
    summary = export(rs, cfg, info, results, steps=loop.step, train_time=loop.train_time, tokens=totals["tokens"],
                     t_start=t_start)
    rs.logger.close()
    return {"summary": summary, "eval": results}


@dataclass
class RewardRun:
    """Everything a reward step and the export need, built once by `setup`."""
    strategy: str
    amp_dtype: object
    run_dir: Path
    schema: object
    pair_objective: bool
    tokenizer: object
    data: dict
    order: LengthOrder
    rm: object               # the reward model (its HF skeleton and head export)
    model: object            # what the optimizer steps (the wrapped rm; the rm itself when frozen)
    forward: RewardForward
    optimizer: object
    logger: MetricLogger
    train_items: list
    pair_w: torch.Tensor
    frozen: bool
    pipelined: bool


def setup(cfg: DictConfig, info: te.DistInfo) -> RewardRun:
    strategy, amp_dtype, run_dir = prepare_run(cfg, info)
    schema = get_schema(cfg.schema)
    pair_objective = cfg.loss.type in PAIR_LOSSES
    if cfg.loss.type != "mse" and not pair_objective:
        raise ConfigError(f"unknown loss.type {cfg.loss.type!r}; choose mse or one of {PAIR_LOSSES}")
    if pair_objective and (cfg.loss.get("length_order") or {}).get("attribute"):
        raise ConfigError(f"loss.length_order adds to loss.type=mse, not {cfg.loss.type}")
    if cfg.model.freeze_backbone and strategy == "fsdp2":
        raise ConfigError("model.freeze_backbone trains only the head: use engine.strategy=single or ddp")

    check_checkpoint_schema(cfg.model.path, schema)  # fail before minutes of data work
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.pad_token)
    data = setup_data(cfg, schema, tokenizer, pair_objective)
    order = LengthOrder(cfg.loss.get("length_order"), schema, data["train"], data["val"], cfg.seed)
    rm = load_reward_model(cfg.model.path, schema, pad_token_id=tokenizer.pad_token_id,
                           dtype=getattr(torch, cfg.model.dtype), attn_implementation=cfg.model.attn_implementation)
    # gradient checkpointing saves activation memory only where gradients flow through the backbone
    recompute = bool(cfg.model.get("gradient_checkpointing", False)) and not cfg.model.freeze_backbone
    if strategy == "megatron":  # TP-sharded backbone, same head and export (engines/megatron/reward_model.py)
        from ..engines.megatron.reward_model import MegatronRewardModel

        rm = MegatronRewardModel(rm, tp=info.tp, pp=info.pp, sequence_parallel=info.sequence_parallel,
                                 recompute=recompute, dtype=getattr(torch, cfg.model.dtype))
    elif recompute:
        rm.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.freeze_backbone:
        rm.freeze_backbone()
    logger = MetricLogger(run_dir, is_main=info.is_main, wandb_cfg=cfg.logging.wandb,
                          config=OmegaConf.to_container(cfg, resolve=True))
    frozen = bool(cfg.model.freeze_backbone)
    model = rm.to(info.device) if frozen else te.wrap_model(rm, strategy, info)
    forward = RewardForward(rm, model, info, amp_dtype, pad_id=tokenizer.pad_token_id)
    if frozen:  # one sharded pass over every input, then the head trains on cached features
        forward.cache = FeatureCache.build(forward, data, run_dir / "cache", cfg, logger)
    optimizer = te.build_optimizer(model.parameters(), cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas),
                                   distributed=strategy == "megatron" and bool(cfg.engine.get("distributed_optimizer", True)))
    if hasattr(optimizer, "describe"):
        print0(optimizer.describe())
    pipelined = getattr(model, "pipelined", False) and not frozen  # frozen: the head trains on cached features
    if order and pipelined:
        raise ConfigError("loss.length_order: not with pipeline parallelism (pp > 1)")
    return RewardRun(strategy, amp_dtype, run_dir, schema, pair_objective, tokenizer, data, order, rm, model, forward,
                     optimizer, logger, data["train_pairs"] if pair_objective else data["train"],
                     torch.tensor(pair_weights(cfg, schema), device=info.device), frozen, pipelined)


def train_step(rs: RewardRun, cfg: DictConfig, info: te.DistInfo, step: int, gb: list[int]) -> StepResult:
    """One global batch: this rank's share in micro-batches (forward + backward), the step loss = mean over gb."""
    model, items = rs.model, rs.train_items
    world = 1 if rs.frozen else info.world_size  # frozen: every rank trains the (tiny) head on all features alike
    local = gb if rs.frozen else rank_slice(gb, info.rank, world)
    n_micro = math.ceil(math.ceil(len(gb) / world) / cfg.train.micro_batch_size)
    chunks = micro_batches(local, cfg.train.micro_batch_size)
    # every rank runs the same number of micro-batches (collectives must match); a rank whose share ran out
    # repeats a sample with weight 0
    parts = [(chunks[j], 1.0) if j < len(chunks) else ([gb[0]], 0.0) for j in range(n_micro)]
    loss_sum, tokens, metrics = 0.0, 0, {}
    if rs.pipelined:  # Megatron PP: the schedule runs all of the step's micro-batches
        with te.autocast(info.device, rs.amp_dtype):
            sums, toks = pipelined_losses(model, [[items[i] for i in idx] for idx, _ in parts],
                                          [w * world / len(gb) for _, w in parts], cfg, rs.pair_w,
                                          rs.tokenizer.pad_token_id, info.device)
        model.finish_grads()
        return StepResult(sum(v * w for v, (_, w) in zip(sums, parts)),
                          sum(t for t, (_, w) in zip(toks, parts) if w), len(gb))
    for j, (idx, weight) in enumerate(parts):
        with te.grad_sync_context(model, "single" if rs.frozen else rs.strategy, sync=j == n_micro - 1):
            with te.autocast(info.device, rs.amp_dtype):
                per_item, n_tok = item_losses(rs.forward, [items[i] for i in idx], cfg, rs.pair_w)
                loss = per_item.sum() * (weight * world / len(gb))
                if rs.order and j == n_micro - 1:  # + λ · mean hinge over the step's pairs (this rank's share)
                    pairs = rs.order.step_pairs(step)
                    term = rs.order.loss(rs.forward, pairs if rs.frozen else pairs[info.rank::world])
                    loss = loss + term * (world / len(pairs))
                    metrics["train/length_order_loss"] = float(term.detach()) / len(pairs)
            loss.backward()
        loss_sum += float(per_item.detach().sum()) * weight
        tokens += n_tok if weight else 0
    return StepResult(loss_sum, tokens, len(gb), metrics=metrics)


def export(rs: RewardRun, cfg: DictConfig, info: te.DistInfo, results: dict, *, steps: int, train_time: float,
           tokens: int, t_start: float) -> dict:
    """summary.json, eval_metrics.json and the HF model with its RM card (rank 0); returns the summary."""
    model_state = te.full_model_state(rs.model)  # collective under FSDP2: every rank calls it
    summary = {
        "steps": steps, "train_time_s": round(train_time, 2), "wall_time_s": round(time.time() - t_start, 2),
        "train_tokens_per_s": round(tokens / max(train_time, 1e-9), 1), "train_tokens": tokens,
        "feature_tokens_per_s": rs.forward.cache.tokens_per_s if rs.forward.cache else None,
        "peak_mem_mb": round(te.peak_memory_mb(info.device), 1), "world_size": info.world_size,
        "tensor_parallel": getattr(info, "tp", 1), "pipeline_parallel": getattr(info, "pp", 1),
        "sequence_parallel": getattr(info, "sequence_parallel", False),
        "strategy": rs.strategy, "frozen_backbone": rs.frozen, "data": rs.data["reports"],
    }
    if not info.is_main:
        return summary
    data, run_dir = rs.data, rs.run_dir
    card = {"template": cfg.template, "max_length": cfg.max_length, "loss": cfg.loss.type,
            "trained_attributes": data["trained_attributes"], "train_label_means": data["train_means"],
            "train_label_counts": data["train_counts"],
            # frozen backbone: the features in run_dir/cache are this RM's; a scorer may reuse them (label stage)
            "feature_fingerprint": rs.forward.cache.fingerprint if rs.forward.cache else None,
            "pair_weights": rs.pair_w.tolist(), "eval": results}
    hf_state = {k.removeprefix("hf_model."): v for k, v in model_state.items()}
    ckpt.save_hf_model(rs.rm.hf_model, hf_state, run_dir / "model", tokenizer=rs.tokenizer, schema=rs.schema,
                       extra_json={RM_CARD: card})
    (run_dir / "eval_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print0(format_table(results["attributes"]))
    for name, acc in results["pairwise_accuracy"].items():
        print0(f"pairwise accuracy [{name}]: {acc['accuracy']} over {acc['pairs']} pairs")
    print0(f"beats the train-mean baseline on: {results['beats_baseline'] or 'none'}")
    if "length_order" in results:
        print0(f"length order [{rs.order.attribute}]: {json.dumps(results['length_order'])}")
    print0(f"model written to {run_dir / 'model'} ({summary['wall_time_s']} s, peak {summary['peak_mem_mb']} MB)")
    return summary


# ===== Pieces ====================================================================================
def setup_data(cfg: DictConfig, schema, tokenizer, pair_objective: bool) -> dict:
    """Load, split by group, tokenize. Returns train/val samples, pairs and what was skipped."""
    specs = [OmegaConf.to_container(s, resolve=True) for s in cfg.data.train]
    conversations, load_stats = load_mixture(specs, schema)
    train_conv, val_conv = split_by_group(conversations, cfg.eval.val_fraction, cfg.seed)
    kw = dict(template=cfg.template, max_length=cfg.max_length, over_length=cfg.over_length)
    train, rep_train = rd.tokenize_rated(train_conv, schema, tokenizer, **kw)
    val, rep_val = rd.tokenize_rated(val_conv, schema, tokenizer, **kw)
    pairs, pair_stats = [], []
    for spec in cfg.data.pairs:
        p, st = load_preference_pairs(OmegaConf.to_container(spec, resolve=True), schema)
        pairs += p
        pair_stats.append(st)
    train_p, val_p = split_by_group(pairs, cfg.eval.val_fraction, cfg.seed) if pairs else ([], [])
    train_pairs, rep_tp = rd.tokenize_pairs(train_p, tokenizer, **kw)
    val_pairs, rep_vp = rd.tokenize_pairs(val_p, tokenizer, **kw)
    if pair_objective and not train_pairs:
        raise ConfigError(f"loss.type={cfg.loss.type} needs preference pairs: set data.pairs")
    if not pair_objective and not train:
        raise DataError(", ".join(str(x.path) for x in cfg.data.train), None, None, "no rated training samples after loading and filtering (see the skip counts above)")
    reports = {"load": load_stats, "pairs_load": pair_stats, "train": rep_train.to_dict(), "val": rep_val.to_dict(),
               "train_pairs": rep_tp.to_dict(), "val_pairs": rep_vp.to_dict(),
               "train_lengths": rd.summarize_lengths([len(s["input_ids"]) for s in train])}
    print0(f"data: {json.dumps({k: reports[k] for k in ('train', 'val', 'train_pairs', 'val_pairs')})}")
    return {"train": train, "val": val, "train_pairs": train_pairs, "val_pairs": val_pairs, "reports": reports,
            "train_means": rd.train_label_means(train, schema), "train_counts": rd.train_label_counts(train, schema),
            "trained_attributes": rd.annotated_attributes(train, schema) if not pair_objective else
            [a for a, w in zip(schema.attributes, pair_weights(cfg, schema)) if w]}


def pair_weights(cfg: DictConfig, schema) -> list[float]:
    """BT scalarization weights in schema order; null means NeMo-Aligner's choice, the helpfulness head."""
    w = cfg.loss.pair_weights
    return weights_vector(schema, {"helpfulness": 1.0} if w is None else OmegaConf.to_container(w))


def input_keys(items: list[dict]) -> tuple[str, ...]:
    """The token-id fields an item is scored on: one rated turn, or a preference pair's two responses."""
    return ("input_ids",) if "input_ids" in items[0] else ("chosen_ids", "rejected_ids")


def losses_from_preds(preds: list[torch.Tensor], items: list[dict], cfg: DictConfig, pair_w: torch.Tensor,
                      missing: float) -> torch.Tensor:
    """Per-item losses (B,) from the (B, K) predictions for each of `input_keys(items)`."""
    if len(preds) == 1:
        labels = torch.tensor([x["labels"] for x in items], dtype=torch.float32, device=preds[0].device)
        return masked_mse(preds[0], labels, labels != missing)
    strength = torch.tensor([x["strength"] for x in items], device=preds[0].device)
    return bradley_terry(scalarize(preds[0], pair_w), scalarize(preds[1], pair_w), strength, cfg.loss.type)


def item_losses(forward: "RewardForward", items: list[dict], cfg: DictConfig, pair_w: torch.Tensor):
    """Per-item losses (B,) for a micro-batch, and its non-pad token count."""
    outs = [forward(items, key) for key in input_keys(items)]
    return losses_from_preds([p for p, _ in outs], items, cfg, pair_w, forward.rm.schema.missing), sum(n for _, n in outs)


def pipelined_losses(model, chunks: list[list[dict]], scales: list[float], cfg: DictConfig, pair_w, pad_id: int,
                     device) -> tuple[list[float], list[int]]:
    """Megatron PP: a step's micro-batches through the 1F1B schedule. A pair's chosen and rejected rows share one
    micro-batch (chosen first). -> (each micro-batch's summed item loss, its non-pad tokens)."""
    micro, tokens = [], []
    for items, scale in zip(chunks, scales):
        keys = input_keys(items)
        ids, mask = pad_token_batch([x[k] for k in keys for x in items], pad_id)
        micro.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "items": items, "scale": scale})
        tokens.append(int(mask.sum()))

    def loss_of(pred, mb):
        n = len(mb["items"])
        per_item = losses_from_preds([pred[k * n:(k + 1) * n] for k in range(pred.shape[0] // n)], mb["items"], cfg,
                                     pair_w, model.schema.missing)
        return per_item.sum() * mb["scale"], per_item.sum()

    return model.pipeline_losses(micro, loss_of), tokens


@torch.no_grad()
def evaluate(forward: "RewardForward", data: dict, schema, cfg: DictConfig, order: LengthOrder = None) -> dict:
    """Held-out regression metrics and pairwise accuracy (all ranks take part; results identical)."""
    val = data["val"]
    results = {"attributes": {}, "pairwise_accuracy": {}, "beats_baseline": []}
    w = weights_vector(schema, OmegaConf.to_container(cfg.eval.pair_weights))
    if val:
        pred = forward.predict(val, "input_ids", cfg.eval.batch_size)
        labels = np.array([s["labels"] for s in val], dtype=np.float64)
        results["attributes"] = regression_metrics(pred, labels, labels != schema.missing, schema.attributes,
                                                   data["train_means"])
        results["beats_baseline"] = beats_baseline(results["attributes"])
        if order:
            results["length_order"] = order.metrics(pred)
        pairs = rd.same_context_pairs(val, w, schema.missing)
        if pairs:
            r = pred @ np.array(w)
            results["pairwise_accuracy"]["same_prompt_human_labels"] = {
                "pairs": len(pairs), "accuracy": pairwise_accuracy(r[[c for c, _ in pairs]], r[[x for _, x in pairs]])}
    if data["val_pairs"]:
        pc = forward.predict(data["val_pairs"], "chosen_ids", cfg.eval.batch_size) @ np.array(w)
        pr = forward.predict(data["val_pairs"], "rejected_ids", cfg.eval.batch_size) @ np.array(w)
        results["pairwise_accuracy"]["preference_pairs"] = {"pairs": len(pc), "accuracy": pairwise_accuracy(pc, pr)}
    results["pair_weights"] = dict(zip(schema.attributes, w))
    return results


def flatten_eval(results: dict) -> dict:
    out = {}
    for a, m in results["attributes"].items():
        out[f"validation/{a}/mse"] = m["mse"]
        out[f"validation/{a}/baseline_mse"] = m["baseline_mse"]
    for name, acc in results["pairwise_accuracy"].items():
        out[f"validation/pair_acc/{name}"] = acc["accuracy"]
    for name in ("val_pair_accuracy", "val_spearman_words"):
        if results.get("length_order", {}).get(name) is not None:
            out[f"validation/length_order/{name}"] = results["length_order"][name]
    return out
