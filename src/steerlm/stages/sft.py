"""Stage 3: attribute-conditioned SFT — a policy that follows attribute values given in its prompt.

Reads top to bottom: set up (process group, schema, tokenizer, data, model, optimizer), train,
evaluate, export. The objective over a global batch B of conversations is

    L = (1 / N_B) · Σ_{c ∈ B} Σ_{t ∈ trained(c)} −log p_θ(x_t | x_<t, c's label strings)

where trained(c) are the response tokens plus each turn's stop string (`sft_template`), and N_B
is the number of trained tokens in B. Dividing by N_B of the *global* batch (not per micro-batch,
as NeMo-Aligner does) makes the step identical under any packing, micro-batching or world size.

Features and their config keys:
- `template` nemo | hf, `sft_format.*`: NeMo-Aligner's exact `<extra_id_*>` rendering, or the
  tokenizer's chat template with the same attribute segment after the assistant header.
- `packing`, `pack_length`: conversations of a global batch packed into rows (BFD), position ids
  restarting per conversation, so attention stays inside each one. A startup probe checks that
  the model honours packed position ids and refuses to pack one that does not.
- `attribute_dropout`: train on random attribute subsets (see `sft_data`).
- `model.lora.enabled` (peft LoRA, `model/` = adapter, `merged/` = merged model) or full fine-tune.
- `engine.strategy` single / ddp / fsdp2 under torchrun; `resume=auto` like stage 1.
- The steerable attributes, their order and defaults (`default_attributes`) are saved with the
  model in `steerlm_sft.json`.

Raises:
    SchemaMismatchError: the labeled data carries a different attribute schema.
    DataError: bad rows; an over-length conversation under over_length=error; nothing to train on.
    ConfigError: a model that ignores packed position ids with packing=true; unknown options.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..attributes import get_schema
from ..data.length_cuts import length_cut_copies
from ..data.packing import collate_packed, collate_padded
from ..data.sources import load_mixture, require_input_schemas
from ..data.split import split_by_group
from ..engines import torch_engine as te
from ..errors import ConfigError, DataError
from ..checkpoint import write_text_atomic
from ..logging import MetricLogger, print0
from ..losses import contrast_loss, next_token_nll, nll_and_sequence_log_probs
from ..models import packed_attention
from ..models.policy import apply_lora, load_causal_lm, make_card, save_policy
from ..models.reward_model import load_tokenizer
from ..sft_template import SFTFormat, encode_conversation
from ..steering import levels
from ..steering import trained_levels
from .training import StepLoop, StepResult, prepare_run, run_distributed
from . import sft_data as sd


def run(cfg: DictConfig) -> dict:
    return run_distributed(_run, cfg)


def _run(cfg: DictConfig, info: te.DistInfo, t_start: float) -> dict:
    # ===== Setup ==============================================================================
    run = setup(cfg, info)
    loop = StepLoop(cfg, info, run.model, run.optimizer, n_items=len(run.train), run_dir=run.run_dir,
                    logger=run.logger, desc="sft", trainable_only=run.lora, strict_resume=not run.lora)
    print0(f"sft: {len(run.train)} train / {len(run.data['val'])} val conversations, {loop.total_steps} steps of "
           f"{loop.global_batch}, packing={cfg.packing} (rows <= {effective_pack_length(cfg)} tokens), "
           f"lora={run.lora} ({run.n_trainable:,} trainable params), strategy={run.strategy}, "
           f"world={info.world_size}, steerable={run.data['steerable']}")

    # ===== Training ===========================================================================
    epoch = {}  # the current epoch's encodings (attribute dropout is re-drawn every epoch) and level offsets

    def epoch_lengths(e: int) -> list[int]:
        epoch["enc"] = sd.encode_epoch(run.train, run.fmt, run.tokenizer, run.schema, dropout=cfg.attribute_dropout,
                                       seed=cfg.seed, epoch=e)
        epoch["offsets"] = None if run.trained is None else sd.level_offsets_epoch(
            run.train, epoch["enc"], run.trained.attributes, run.trained.centers, dropout=cfg.attribute_dropout,
            seed=cfg.seed, epoch=e)
        run.contrast.start_epoch(e)
        epoch["lengths"] = [len(ids) for ids, _ in epoch["enc"]]
        return epoch["lengths"]

    def evaluate_now(step: int) -> None:
        if run.data["val"]:
            run.logger.log({"validation/loss": evaluate_loss(run.model, run.data["val"], cfg, info, run.pad_id,
                                                             run.amp_dtype, run.trained)}, step)
            run.conditioning.log(run.model, run.logger, step, loop.totals["trained"])

    def log_metrics() -> dict:
        norms = run.trained.norms() if run.trained is not None else {}
        return {**run.contrast.pop_metrics(info.device), **{f"train/level_vector_norm/{a}": n for a, n in norms.items()}}

    if loop.step == 0:
        run.conditioning.log(run.model, run.logger, 0, 0)  # the base model: where the curve starts
    # unpacked rows pad to the longest in a micro-batch: group similar lengths; packed rows need no grouping
    group_by_length = (not cfg.packing) if cfg.train.group_by_length is None else bool(cfg.train.group_by_length)
    totals = loop.run(epoch_lengths, group_by_length, lambda step, e, gb: train_step(run, cfg, info, epoch, gb),
                      evaluate=evaluate_now, metrics=log_metrics)

    # ===== Evaluation and export ==============================================================
    val_loss = evaluate_loss(run.model, run.data["val"], cfg, info, run.pad_id, run.amp_dtype, run.trained)
    if val_loss is not None:  # None: nothing held out
        run.logger.log({"validation/loss": val_loss}, loop.step)
    conditioning = run.conditioning.log(run.model, run.logger, loop.step, totals["trained"])
    summary = export(run, cfg, info, steps=loop.step, train_time=loop.train_time, totals=totals, val_loss=val_loss,
                     conditioning=conditioning, t_start=t_start)
    run.logger.close()
    return {"summary": summary}


@dataclass
class SFTRun:
    """Everything an SFT step and the export need, built once by `setup`."""
    strategy: str
    amp_dtype: object
    run_dir: Path
    schema: object
    fmt: SFTFormat
    lora: bool
    tokenizer: object
    pad_id: int
    data: dict
    train: list
    level_data: object       # the post-hoc level vectors' data (None: off or trained)
    val_ids: set
    hf_model: object         # the HF model the export writes (Megatron: the skeleton it converts back to)
    model: object            # what the optimizer steps (wrapped)
    contrast: "LabelContrast"
    trained: Optional[trained_levels.TrainedLevels]
    optimizer: object
    n_trainable: int
    logger: MetricLogger
    conditioning: "ConditioningProbe"
    end_ids: Optional[torch.Tensor]
    end_weight: float


def setup(cfg: DictConfig, info: te.DistInfo) -> SFTRun:
    strategy, amp_dtype, run_dir = prepare_run(cfg, info)
    schema = get_schema(cfg.schema)
    fmt = SFTFormat.from_dict({"template": cfg.template, **OmegaConf.to_container(cfg.sft_format, resolve=True)})
    lora = bool(cfg.model.lora.enabled)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.pad_token)
    data = setup_data(cfg, schema, tokenizer, fmt)
    level_data = levels.check_for_run(cfg.get("level_steering"), OmegaConf.to_container(cfg.data.train, resolve=True),
                                      data["steerable"])  # the vectors' data (None: off), checked before training
    end_weight = float(cfg.get("end_of_turn_weight", 1.0))
    model = load_policy_model(cfg, strategy, info)
    val_ids = {c["id"] for c in data["val_conversations"]}
    contrast = LabelContrast(cfg, data["train"], tokenizer, fmt, schema, strategy, pad_id=tokenizer.pad_token_id)
    if end_weight != 1.0 and (strategy == "megatron" or contrast.on):
        raise ConfigError("end_of_turn_weight != 1 is a torch-engine option without the label contrast")
    trained = trained_levels.setup_for_run(  # level_steering.train: V learned with the SFT loss (None: off)
        cfg.get("level_steering"), level_data, model, tokenizer, fmt, schema, strategy=strategy,
        contrast=contrast.on, skip_ids=val_ids,
        max_length=int(cfg.max_length or 512), device=info.device, train_examples=data["train"])
    hf_model = model.hf_model if strategy == "megatron" else model
    model = te.wrap_model(model, strategy, info)
    if cfg.packing and strategy != "megatron":  # Megatron builds the block-diagonal mask itself (test_megatron_stages)
        check_packing_support(model, info.device, tokenizer.pad_token_id)
    logger = MetricLogger(run_dir, is_main=info.is_main, wandb_cfg=cfg.logging.wandb,
                          config=OmegaConf.to_container(cfg, resolve=True))
    if strategy == "megatron":  # every TP shard and pipeline stage, once
        from ..engines.megatron.grads import trainable_parameters

        n_trainable = trainable_parameters(model)
    else:
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = te.build_optimizer([p for p in model.parameters() if trained is None or p is not trained.weight],
                                   cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas),
                                   distributed=strategy == "megatron" and bool(cfg.engine.get("distributed_optimizer", True)))
    if trained is not None:  # its own learning rate, no weight decay (a decayed V shrinks toward "no steering")
        optimizer.add_param_group({"params": [trained.weight], "lr": float(cfg.level_steering.get("lr", 0.01)),
                                   "weight_decay": 0.0})
    if hasattr(optimizer, "describe"):
        print0(optimizer.describe())
    conditioning = ConditioningProbe(cfg, data, tokenizer, fmt, schema, info, amp_dtype, strategy, trained)
    return SFTRun(strategy, amp_dtype, run_dir, schema, fmt, lora, tokenizer, tokenizer.pad_token_id, data,
                  data["train"], level_data, val_ids, hf_model, model, contrast, trained, optimizer, n_trainable, logger,
                  conditioning, end_of_turn_ids(fmt, tokenizer) if end_weight != 1.0 else None, end_weight)


def load_policy_model(cfg: DictConfig, strategy: str, info: te.DistInfo):
    """The policy to train: HF causal LM (+ gradient checkpointing, + peft LoRA), or Megatron's TP-sharded GPTModel."""
    attn = cfg.model.attn_implementation
    if cfg.packing and attn == "sdpa":  # per-conversation causal sdpa instead of a block-diagonal mask
        attn = packed_attention.register()
    model = load_causal_lm(cfg.model.path, dtype=getattr(torch, cfg.model.dtype), attn_implementation=attn)
    if strategy == "megatron":  # TP-sharded GPTModel with its own LoRA and recompute; exported back to this layout
        return megatron_policy(cfg, model, info)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.model.lora.enabled:
        model = apply_lora(model, OmegaConf.to_container(cfg.model.lora, resolve=True))
    return model


def train_step(run: SFTRun, cfg: DictConfig, info: te.DistInfo, epoch: dict, gb: list[int]) -> StepResult:
    """One global batch: this rank's rows in micro-batches (forward + backward); loss = NLL / N_B, N_B = the
    trained tokens of the whole global batch."""
    model, contrast, trained, enc, world = run.model, run.contrast, run.trained, epoch["enc"], info.world_size
    lengths = epoch["lengths"]
    n_targets = sum(sum(enc[i][1]) for i in gb)  # N_B: trained tokens of the global batch
    plan = sd.plan_step(gb, lengths, packing=cfg.packing, pack_length=effective_pack_length(cfg), world_size=world,
                        micro_batch_size=cfg.train.micro_batch_size)[info.rank]
    weights = [1.0 if rows else 0.0 for rows in plan]  # empty micro-batch: a weight-0 repeat keeps collectives in step
    micro = [make_batch(rows or [[gb[0]]], enc, cfg.packing, run.pad_id, info.device, epoch["offsets"])
             for rows in plan]
    if getattr(model, "pipelined", False):  # Megatron PP: the 1F1B schedule runs the step's micro-batches
        with te.autocast(info.device, run.amp_dtype):
            nlls = model.pipeline_nll(micro, [w * world / n_targets for w in weights])
        model.finish_grads()
    else:
        nlls = []
        n_contrast = contrast.count(gb)  # contrast pairs of the global batch: the term's normaliser
        for j, batch in enumerate(micro):
            with te.grad_sync_context(model, run.strategy, sync=j == len(plan) - 1):
                with te.autocast(info.device, run.amp_dtype):
                    if contrast.on:
                        nll, c_loss = contrast.micro_step(model, plan[j] or [[gb[0]]], batch, info.device)
                        loss = nll / n_targets + contrast.weight * c_loss / max(n_contrast, 1)
                    else:
                        if trained is not None:  # kept through backward: checkpointed layers recompute
                            trained.set_offsets(batch["level_offsets"])
                        nll, _ = next_token_nll(model, batch, run.end_ids, run.end_weight)
                        loss = nll / n_targets
                (loss * weights[j] * world).backward()
            nlls.append(float(nll.detach()))
    return StepResult(loss_sum=sum(nll * w for w, nll in zip(weights, nlls)),
                      tokens=sum(int(b["n_tokens"]) for w, b in zip(weights, micro) if w),
                      normaliser=n_targets,
                      padded=sum(b["input_ids"].numel() for w, b in zip(weights, micro) if w))


def export(run: SFTRun, cfg: DictConfig, info: te.DistInfo, *, steps: int, train_time: float, totals: dict,
           val_loss: Optional[float], conditioning: Optional[dict], t_start: float) -> dict:
    """model/ (+ merged/) with the card and level steering, summary.json, validation.jsonl (rank 0)."""
    state = te.full_model_state(run.model)  # collective under FSDP2
    if run.trained is not None:  # V ships as the checkpoint's level steering, never inside the HF weights
        state = {k: v for k, v in state.items() if trained_levels.MODULE_NAME not in k}
    summary = {
        "steps": steps, "train_time_s": round(train_time, 2), "wall_time_s": round(time.time() - t_start, 2),
        "tokens_per_s": round(totals["tokens"] / max(train_time, 1e-9), 1),
        "trained_tokens_per_s": round(totals["trained"] / max(train_time, 1e-9), 1),
        "packing_efficiency": round(totals["tokens"] / max(totals["padded"], 1), 4),
        "tokens": totals["tokens"], "trained_tokens": totals["trained"],
        "validation_loss": val_loss, "peak_mem_mb": round(te.peak_memory_mb(info.device), 1),
        "world_size": info.world_size, "tensor_parallel": getattr(info, "tp", 1),
        "pipeline_parallel": getattr(info, "pp", 1), "sequence_parallel": getattr(info, "sequence_parallel", False),
        "strategy": run.strategy, "lora": run.lora, "trainable_params": run.n_trainable,
        "steerable_attributes": run.data["steerable"], "data": run.data["reports"], "conditioning": conditioning,
    }
    if not info.is_main:
        return summary
    card = make_card(fmt=run.fmt.to_dict(), schema=run.schema, steerable=run.data["steerable"],
                     defaults=OmegaConf.to_container(cfg.default_attributes, resolve=True),
                     base_model=str(cfg.model.path), max_length=cfg.max_length, lora=run.lora,
                     extra={"attribute_dropout": cfg.attribute_dropout, "validation_loss": val_loss})
    written = save_policy(run.run_dir / "model", hf_model=run.hf_model, state=state, tokenizer=run.tokenizer,
                          schema=run.schema, card=card, lora=run.lora, base_path=str(cfg.model.path),
                          save_merged=run.lora and cfg.model.lora.save_merged, dtype=getattr(torch, cfg.model.dtype))
    if run.trained is not None:
        steering = run.trained.level_steering({"init": str(cfg.level_steering.get("init", "mean_difference")),
                                               "steps": steps, "trained_tokens": totals["trained"]},
                                              gain=float(cfg.level_steering.get("inference_gain") or 1.0))
        for d in written:
            steering.save(d)
        summary["level_steering"] = {**steering.describe(), "trained": True, "norms": run.trained.norms()}
    else:
        summary["level_steering"] = levels.save_for_run(
            cfg.get("level_steering"), run.level_data, written, run.tokenizer, run.fmt, run.schema, device=info.device,
            max_length=int(cfg.max_length or 512), skip_ids=run.val_ids)
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_text_atomic(run.run_dir / "validation.jsonl", "".join(
        json.dumps({k: c[k] for k in ("id", "group", "system", "source", "turns") if k in c}, ensure_ascii=False)
        + "\n" for c in run.data["val_conversations"]))
    run.schema.save(run.run_dir)  # validation.jsonl carries the schema, as every label file
    loss_text = "n/a (no held-out conversations)" if val_loss is None else f"{val_loss:.4f}"
    print0(f"sft: validation loss {loss_text}; {summary['tokens_per_s']} tokens/s (non-pad), packing "
           f"efficiency {summary['packing_efficiency']:.1%}, peak {summary['peak_mem_mb']} MB")
    print0(f"model written to {', '.join(str(p) for p in written)} ({summary['wall_time_s']} s)")
    return summary


class LabelContrast:
    """`contrast.weight` > 0: a second term that teaches the label string directly. Per conversation, the last
    response y is also rendered with one attribute of its label moved to another level ℓ' (`contrast.other`), and

        L = L_SFT + w · (1/C_B) Σ_c −log σ(β [log π(y_c | x_c, ℓ_c) − log π(y_c | x_c, ℓ'_c)])

    (C_B: contrast pairs in the global batch). Plain SFT learns the attribute only through the small share of a
    response's likelihood its label explains; this term is exactly that share. Costs a second forward per
    conversation. torch engine; packed or padded rows."""

    def __init__(self, cfg, train, tokenizer, fmt, schema, strategy, pad_id: int):
        c = cfg.get("contrast") or {}
        self.weight, self.beta = float(c.get("weight", 0.0) or 0.0), float(c.get("beta", 1.0))
        self.on = self.weight > 0
        if self.on and strategy == "megatron":
            raise ConfigError("contrast.weight > 0 is a torch-engine option (engine=megatron: set contrast.weight=0)")
        attrs = c.get("attributes")
        self.attributes = None if attrs is None else list(attrs)
        self.other = str(c.get("other", "random"))
        self.args = (train, fmt, tokenizer, schema, cfg.attribute_dropout, cfg.seed)
        self.packing, self.pad_id, self.enc = bool(cfg.packing), pad_id, []
        self.names = [a for a in schema.attributes if self.attributes is None or a in self.attributes]
        self.sums = [0.0] * (2 + 2 * len(self.names))  # loss, pairs, then (margin sum, pairs) per attribute

    def start_epoch(self, epoch: int) -> None:
        if self.on:
            train, fmt, tokenizer, schema, dropout, seed = self.args
            self.enc = sd.contrast_epoch(train, fmt, tokenizer, schema, attributes=self.attributes, dropout=dropout,
                                         seed=seed, epoch=epoch, other=self.other)

    def count(self, batch: list[int]) -> int:
        return sum(self.enc[i] is not None for i in batch) if self.on else 0

    def micro_step(self, model, rows: list[list[int]], batch: dict, device) -> tuple:
        """-> (Σ NLL of the trained tokens, Σ contrast loss over this micro-batch's pairs)."""
        local = {i: k for k, i in enumerate(i for row in rows for i in row)}
        nll, own = nll_and_sequence_log_probs(model, batch, sequence_index(batch, rows, local, self.packing), len(local))
        c_rows = [[i for i in row if self.enc[i] is not None] for row in rows]
        c_rows = [row for row in c_rows if row]
        if not c_rows:
            return nll, own.sum() * 0.0
        c_batch = make_batch(c_rows, [e and e[:2] for e in self.enc], self.packing, self.pad_id, device)
        _, other = nll_and_sequence_log_probs(model, c_batch, sequence_index(c_batch, c_rows, local, self.packing),
                                              len(local))
        pairs = torch.tensor([local[i] for row in c_rows for i in row], device=own.device)
        loss = contrast_loss(own[pairs], other[pairs], self.beta)
        margins = (own[pairs] - other[pairs]).detach().tolist()
        self.sums[0] += float(loss.detach())
        self.sums[1] += len(margins)
        for i, m in zip((i for row in c_rows for i in row), margins):
            k = 2 + 2 * self.names.index(self.enc[i][2])
            self.sums[k] += m
            self.sums[k + 1] += 1
        return nll, loss

    def pop_metrics(self, device) -> dict:
        if not self.on:
            return {}
        totals = te.all_reduce_sum(self.sums, device)
        self.sums = [0.0] * len(self.sums)
        n = max(totals[1], 1)
        margin = sum(totals[2::2]) / n
        # log π(y|own) − log π(y|other), nats, per moved attribute: in the first epoch every batch is unseen data,
        # so this is a held-out measure of how much each label string already matters
        per = {f"train/contrast_margin/{a}": totals[2 + 2 * k] / totals[3 + 2 * k]
               for k, a in enumerate(self.names) if totals[3 + 2 * k]}
        return {"train/contrast_loss": totals[0] / n, "train/contrast_margin": margin, **per}


def sequence_index(batch: dict, rows: list[list[int]], local: dict, packing: bool) -> torch.Tensor:
    """(B, T): the local index of the conversation each token belongs to, −1 on row padding. Packed rows restart
    position ids at every conversation (and at the padding), which numbers the segments."""
    ids = batch["input_ids"]
    seg = ((batch["position_ids"] == 0).cumsum(-1) - 1) if packing else torch.zeros_like(ids)
    table = torch.full((len(rows), max(map(len, rows)) + 1), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        table[r, :len(row)] = torch.tensor([local[i] for i in row])
    return table.to(ids.device).gather(1, seg.clamp(max=table.shape[1] - 1))


class ConditioningProbe:
    """`eval.conditioning`: conditioning strength (steerlm.conditioning) of the policy on held-out labeled
    conversations, before training, every `eval_every` steps and at the end, logged against the trained tokens
    seen, so a run shows whether (and when) the attribute string starts to matter. torch engine only."""

    def __init__(self, cfg, data, tokenizer, fmt, schema, info, amp_dtype, strategy, trained=None):
        c = cfg.eval.get("conditioning") or {}
        attrs = c.get("attributes")
        attrs = [a for a in data["steerable"] if a in (attrs if attrs is not None else data["steerable"])]
        self.on = bool(attrs) and int(c.get("n", 0) or 0) > 0 and bool(data["val_conversations"])
        if self.on and strategy == "megatron":
            print0("eval.conditioning: measured on the torch engine only; skipped under engine=megatron")
            self.on = False
        self.attrs, self.n, self.levels = attrs, int(c.get("n", 0) or 0), list(c.get("levels") or [0, 2, 4])
        self.args = (tokenizer, fmt, schema, data["val_conversations"])
        self.device, self.amp, self.max_length = info.device, amp_dtype, int(c.get("max_length") or cfg.max_length)
        self.trained = trained  # level_steering.train: each level is scored under its level steering, as it trains

    def log(self, model, logger, step: int, trained_tokens: int) -> Optional[dict]:
        if not self.on:
            return None
        from ..conditioning import measure

        tokenizer, fmt, schema, convs = self.args
        steering_of = None
        if self.trained is not None:
            self.trained.set_offsets(None)  # the probe's own per-level steering instead of the labels' offsets
            ls, moved = self.trained.level_steering(), {a for a, n in self.trained.norms().items() if n > 0}
            steering_of = lambda a, v: ls.spec({a: v}) if a in moved else None  # noqa: E731  (init zeros: no-op)
        r = measure(te.unwrap(model), tokenizer, fmt, schema, convs, self.attrs, self.levels, device=self.device,
                    n_max=self.n, amp_dtype=self.amp, max_length=self.max_length, n_boot=1000,
                    steering_of=steering_of)
        te.reshard(model)
        metrics = {"conditioning/trained_tokens": trained_tokens, "conditioning/seconds": r["seconds"]}
        for a, m in r["attributes"].items():
            if m.get("strength"):
                s = m["strength"]
                metrics.update({f"conditioning/{a}": s["value"], f"conditioning/{a}_lo": s["lo"],
                                f"conditioning/{a}_hi": s["hi"]})
        logger.log(metrics, step)
        return r



def megatron_policy(cfg: DictConfig, hf_model, info):
    """engine=megatron: full fine-tune or LoRA on the parallel linears, of padded or packed rows; gradient
    checkpointing is Megatron's full-layer recompute."""
    from ..engines.megatron.causal_lm import MegatronCausalLM

    lora = OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.lora.enabled else None
    if lora and lora.get("top_layers") is not None:
        raise ConfigError("model.lora.top_layers is a torch-engine option; engine=megatron adapts every layer")
    return MegatronCausalLM(hf_model, tp=info.tp, pp=info.pp, sequence_parallel=info.sequence_parallel,
                            recompute=bool(cfg.model.gradient_checkpointing), dtype=getattr(torch, cfg.model.dtype),
                            lora=lora)


def setup_data(cfg: DictConfig, schema, tokenizer, fmt: SFTFormat) -> dict:
    """Load (schema-checked), split by group, encode; report what was skipped."""
    specs = [OmegaConf.to_container(s, resolve=True) for s in cfg.data.train]
    require_input_schemas(specs, schema, other_what=f"schema {schema.name!r} of this run")
    conversations, load_stats = load_mixture(specs, schema)
    train_conv, val_conv = split_by_group(conversations, cfg.eval.val_fraction, cfg.seed)
    where = ", ".join(str(s.get("path")) for s in specs)
    cuts = cfg.get("length_cuts") or {}
    cut_stats = None
    if cuts.get("attribute"):  # training split only: validation and the conditioning probe keep the data as it is
        if cuts.attribute not in schema:
            raise ConfigError(f"length_cuts.attribute={cuts.attribute!r} is not in schema {schema.name!r}")
        def fits(conv: dict) -> bool:  # the trainer's own test: encoded with its full label string
            turns = sd.drop_trailing_user_turns(conv["turns"])
            return len(encode_conversation(fmt, tokenizer, schema, conv["system"], turns)[0]) <= cfg.max_length

        train_conv, cut_stats = length_cut_copies(train_conv, cuts.attribute, [int(v) for v in schema.levels()],
                                                  copies=int(cuts.copies), relabel=bool(cuts.relabel), seed=cfg.seed,
                                                  fits=fits)
        print0(f"length_cuts: {json.dumps(cut_stats)}")
    kw = dict(max_length=cfg.max_length, over_length=cfg.over_length, where=where)
    train, rep_train = sd.encode_examples(train_conv, fmt, tokenizer, schema, **kw)
    val, rep_val = sd.encode_examples(val_conv, fmt, tokenizer, schema, **kw)
    if not train:
        raise DataError(where, None, None, "no trainable conversations after loading and filtering (see the skip counts)")
    reports = {"load": load_stats, "train": rep_train.to_dict(), "val": rep_val.to_dict(), "length_cuts": cut_stats}
    print0(f"data: train {json.dumps({k: v for k, v in rep_train.to_dict().items() if k != 'attribute_counts'})}")
    return {"train": train, "val": val, "reports": reports, "steerable": sd.steerable_attributes(rep_train, schema),
            "val_conversations": val_conv}


def end_of_turn_ids(fmt: SFTFormat, tokenizer) -> torch.Tensor:
    """The token ids that end a response (single-token stop strings, the eos): `end_of_turn_weight` weights them."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for s in fmt.resolved_stop_strings(tokenizer):
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(toks) == 1:
            ids.add(toks[0])
    if not ids:
        raise ConfigError("end_of_turn_weight needs an end of turn that is one token (an eos or a one-token stop string)")
    return torch.tensor(sorted(ids))


def effective_pack_length(cfg: DictConfig) -> int:
    """Row capacity: `pack_length`, raised to `max_length` so that every kept conversation fits a row."""
    return max(int(cfg.pack_length or cfg.max_length), int(cfg.max_length))


def make_batch(rows: list[list[int]], enc: list, packing: bool, pad_id: int, device: torch.device,
               offsets: Optional[list] = None) -> dict:
    """`offsets` (level_steering.train): each conversation's (T, A) level offsets, laid out as its tokens."""
    if packing:
        batch = collate_packed([[enc[i] for i in row] for row in rows], pad_id)
    else:
        batch = collate_padded([enc[row[0]] for row in rows], pad_id)
    if offsets is not None:
        batch["level_offsets"] = trained_levels.batch_offsets(rows, offsets, packing, batch["input_ids"].shape[1])
    batch["n_tokens"] = sum(len(enc[i][0]) for row in rows for i in row)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def check_packing_support(model, device: torch.device, pad_id: int) -> None:
    """Refuse to pack for a model whose attention ignores packed position ids (it would attend across conversations)."""
    g = torch.Generator().manual_seed(0)
    vocab = min(1000, getattr(getattr(te.unwrap(model), "config", None), "vocab_size", 1000))
    a = torch.randint(10, vocab, (1, 6), generator=g)
    b = torch.randint(10, vocab, (1, 7), generator=g)
    was_training = model.training
    model.eval()
    alone = model(input_ids=b.to(device), use_cache=False).logits[0, -1].float()
    packed = collate_packed([[(a[0].tolist(), [False] * 6), (b[0].tolist(), [False] * 7)]], pad_id)
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items() if k != "loss_mask"}
    packed = model(**kwargs, use_cache=False).logits[0, -1].float()
    model.train(was_training)
    te.reshard(model)
    if not torch.allclose(alone, packed, atol=1e-3, rtol=1e-3):
        raise ConfigError(f"{type(te.unwrap(model)).__name__} attends across packed sequences (it ignores packed "
                          "position ids with this attn_implementation): set packing=false")


@torch.no_grad()
def evaluate_loss(model, val: list, cfg: DictConfig, info: te.DistInfo, pad_id: int, amp_dtype,
                  trained=None) -> Optional[float]:
    """Token-mean NLL of the held-out conversations (full label strings; with trained level vectors, each under its
    own labels' steering), sharded over ranks; None without any (a NaN would make summary.json invalid JSON)."""
    if not val:
        return None
    model.eval()
    enc = [(ex["ids"], ex["mask"]) for ex in val]
    offsets = None if trained is None else sd.level_offsets_epoch(val, enc, trained.attributes, trained.centers,
                                                                  dropout=0.0, seed=0, epoch=0)
    lengths = [len(ids) for ids, _ in enc]
    order = sorted(range(len(val)), key=lambda i: -lengths[i])
    plan = sd.plan_step(order, lengths, packing=cfg.packing, pack_length=effective_pack_length(cfg),
                        world_size=info.world_size, micro_batch_size=cfg.train.micro_batch_size)[info.rank]
    nll_sum, n_sum = 0.0, 0
    for rows in plan:
        batch = make_batch(rows or [[order[0]]], enc, cfg.packing, pad_id, info.device, offsets)
        if trained is not None:
            trained.set_offsets(batch["level_offsets"])
        with te.autocast(info.device, amp_dtype):
            if getattr(model, "pipelined", False):
                nll, n = model.pipeline_nll([batch], [0.0], forward_only=True)[0], int(batch["loss_mask"][:, 1:].sum())
            else:
                nll, n = next_token_nll(model, batch)
        if rows:
            nll_sum, n_sum = nll_sum + float(nll), n_sum + n
    te.reshard(model)
    nll_total, n_total = te.all_reduce_sum([nll_sum, n_sum], info.device)
    return round(nll_total / max(n_total, 1), 5)
