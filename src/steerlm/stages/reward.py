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

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..attributes import get_schema, weights_vector
from ..data.batching import global_batches, micro_batches, pad_token_batch, rank_slice
from ..data.sources import load_mixture, load_preference_pairs
from ..data.split import split_by_group
from ..engines import torch_engine as te
from ..errors import ConfigError, DataError
from ..length_order import LengthOrder
from ..logging import MetricLogger, print0
from ..losses import PAIR_LOSSES, bradley_terry, masked_mse, scalarize
from ..metrics import beats_baseline, format_table, pairwise_accuracy, regression_metrics
from ..models.reward_model import check_checkpoint_schema, load_reward_model, load_tokenizer
from .training import maybe_resume, prepare_run, run_distributed, save_state
from . import reward_data as rd
from ..scoring import RM_CARD
from .reward_forward import FeatureCache, RewardForward


def run(cfg: DictConfig) -> dict:
    return run_distributed(_run, cfg)


def _run(cfg: DictConfig, info: te.DistInfo, t_start: float) -> dict:
    # ===== Setup ==============================================================================
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
    train_items = data["train_pairs"] if pair_objective else data["train"]
    lengths = [len(x["input_ids"]) if "input_ids" in x else len(x["chosen_ids"]) + len(x["rejected_ids"])
               for x in train_items]
    G = cfg.train.global_batch_size
    steps_per_epoch = math.ceil(len(train_items) / G)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, te.lr_lambda(
        cfg.optim.schedule, cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio))
    pair_w = torch.tensor(pair_weights(cfg, schema), device=info.device)

    step, epoch, start_batch = maybe_resume(cfg.resume, run_dir, model, optimizer, scheduler, strict=not frozen)

    # ===== Training ===========================================================================
    print0(f"reward: {len(train_items)} train {'pairs' if pair_objective else 'samples'}, "
           f"{len(data['val'])} val samples, {total_steps} steps of {G}, strategy={strategy}, "
           f"world={info.world_size}, frozen_backbone={frozen}")
    sharded = not frozen  # frozen: every rank trains the (tiny) head on all features identically
    world = info.world_size if sharded else 1
    mbs = cfg.train.micro_batch_size
    bar = tqdm(total=total_steps, initial=step, desc="reward", disable=not info.is_main, dynamic_ncols=True)
    t_train, tokens_seen = time.time(), 0
    pipelined = getattr(model, "pipelined", False) and not frozen  # frozen: the head trains on cached features
    if order and pipelined:
        raise ConfigError("loss.length_order: not with pipeline parallelism (pp > 1)")
    while step < total_steps:
        batches = global_batches(lengths, G, seed=cfg.seed, epoch=epoch, group_by_length=cfg.train.group_by_length)
        for b in range(start_batch, len(batches)):
            t0 = time.time()
            gb = batches[b]
            local = rank_slice(gb, info.rank, world) if sharded else gb
            n_micro = math.ceil(math.ceil(len(gb) / world) / mbs)
            chunks = micro_batches(local, mbs)
            loss_sum, tokens, order_loss = 0.0, 0, None
            model.train()
            # every rank runs the same number of micro-batches (collectives must match);
            # a rank whose share ran out repeats a sample with weight 0
            parts = [(chunks[j], 1.0) if j < len(chunks) else ([gb[0]], 0.0) for j in range(n_micro)]
            if pipelined:  # Megatron PP: the schedule runs all of the step's micro-batches
                with te.autocast(info.device, amp_dtype):
                    sums, toks = pipelined_losses(model, [[train_items[i] for i in idx] for idx, _ in parts],
                                                  [w * world / len(gb) for _, w in parts], cfg, pair_w,
                                                  tokenizer.pad_token_id, info.device)
                model.finish_grads()
                loss_sum = sum(v * w for v, (_, w) in zip(sums, parts))
                tokens = sum(t for t, (_, w) in zip(toks, parts) if w)
            else:
                for j, (idx, weight) in enumerate(parts):
                    with te.grad_sync_context(model, strategy if sharded else "single", sync=j == n_micro - 1):
                        with te.autocast(info.device, amp_dtype):
                            per_item, n_tok = item_losses(forward, [train_items[i] for i in idx], cfg, pair_w)
                            loss = per_item.sum() * (weight * world / len(gb))
                            if order and j == n_micro - 1:  # + λ · mean hinge over the step's pairs (this rank's share)
                                pairs = order.step_pairs(step)
                                term = order.loss(forward, pairs[info.rank::world]) if sharded else order.loss(forward, pairs)
                                loss = loss + term * (world / len(pairs))
                                order_loss = float(term.detach()) / len(pairs)
                        loss.backward()
                    loss_sum += float(per_item.detach().sum()) * weight
                    tokens += n_tok if weight else 0
            grad_norm = te.clip_grad_norm(model, cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_total, tokens_total = te.all_reduce_sum([loss_sum, tokens], info.device) if sharded else (loss_sum, tokens)
            tokens_seen += tokens_total
            dt = time.time() - t0
            if step % cfg.train.log_every == 0 or step == total_steps:
                logger.log({"train/loss": loss_total / len(gb), "train/lr": scheduler.get_last_lr()[0],
                            "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_total / dt,
                            "train/peak_mem_mb": te.peak_memory_mb(info.device), "train/epoch": epoch,
                            **({"train/length_order_loss": order_loss} if order_loss is not None else {})}, step,
                           echo=not frozen)
            bar.update(1)
            if cfg.train.save_every > 0 and step % cfg.train.save_every == 0 and step < total_steps:
                save_state(run_dir, step, model, optimizer, scheduler, epoch=epoch, next_batch=b + 1,
                           n_batches=len(batches), info=info, keep_last=cfg.train.keep_checkpoints,
                           trainable_only=cfg.model.freeze_backbone)
            if cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0 and step < total_steps:
                logger.log(flatten_eval(evaluate(forward, data, schema, cfg, order)), step)
                te.reshard(model)  # FSDP2: drop the unsharded copy the eval forward left behind
            if step >= total_steps:
                break
        epoch, start_batch = epoch + 1, 0
    bar.close()
    train_time = time.time() - t_train

    # ===== Evaluation and export ==============================================================
    results = evaluate(forward, data, schema, cfg, order)
    logger.log(flatten_eval(results), step, echo=False)
    model_state = te.full_model_state(model)
    summary = {
        "steps": step, "train_time_s": round(train_time, 2), "wall_time_s": round(time.time() - t_start, 2),
        "train_tokens_per_s": round(tokens_seen / max(train_time, 1e-9), 1), "train_tokens": tokens_seen,
        "feature_tokens_per_s": forward.cache.tokens_per_s if forward.cache else None,
        "peak_mem_mb": round(te.peak_memory_mb(info.device), 1), "world_size": info.world_size,
        "tensor_parallel": getattr(info, "tp", 1), "pipeline_parallel": getattr(info, "pp", 1),
        "sequence_parallel": getattr(info, "sequence_parallel", False),
        "strategy": strategy, "frozen_backbone": frozen, "data": data["reports"],
    }
    if info.is_main:
        card = {"template": cfg.template, "max_length": cfg.max_length, "loss": cfg.loss.type,
                "trained_attributes": data["trained_attributes"], "train_label_means": data["train_means"],
                "train_label_counts": data["train_counts"],
                # frozen backbone: the features in run_dir/cache are this RM's; a scorer may reuse them (label stage)
                "feature_fingerprint": forward.cache.fingerprint if forward.cache else None,
                "pair_weights": pair_w.tolist(), "eval": results}
        hf_state = {k.removeprefix("hf_model."): v for k, v in model_state.items()}
        ckpt.save_hf_model(rm.hf_model, hf_state, run_dir / "model", tokenizer=tokenizer, schema=schema,
                           extra_json={RM_CARD: card})
        (run_dir / "eval_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print0(format_table(results["attributes"]))
        for name, acc in results["pairwise_accuracy"].items():
            print0(f"pairwise accuracy [{name}]: {acc['accuracy']} over {acc['pairs']} pairs")
        print0(f"beats the train-mean baseline on: {results['beats_baseline'] or 'none'}")
        if "length_order" in results:
            print0(f"length order [{order.attribute}]: {json.dumps(results['length_order'])}")
        print0(f"model written to {run_dir / 'model'} ({summary['wall_time_s']} s, peak {summary['peak_mem_mb']} MB)")
    logger.close()
    return {"summary": summary, "eval": results}


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
