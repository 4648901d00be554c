"""Resumable training state for engine=megatron: one shard file per (PP, TP) rank, resumable at any split.

    checkpoints/step_N/
        shard_pp00_tp00.safetensors   that rank's tensors in Megatron names: "weight/<name>", "exp_avg/<name>",
        shard_pp00_tp01.safetensors   "exp_avg_sq/<name>" and, with bf16 weights, the fp32 "master/<name>"
        ...                           (the RM head: "<kind>/head.<name>")
        megatron.json                 the split, the model shape, AdamW's step and param groups
        optimizer.pt, state.json      RNG, scheduler, epoch and batch (as the torch engine's checkpoints)

Data-parallel replica 0 writes its shards (the distributed optimizer first sends every owner's share there),
so no rank ever holds more than its own slice: a 70B model's weights, moments and masters (~1 TB) never meet
in one process. `run_dir` must be on a filesystem every node sees. Resuming at the same split reads one
file per rank; at another split, every rank reads all shards once and re-slices them through the HF mapping
(convert.py), which holds the whole model in each rank's CPU memory for that moment.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ... import checkpoint as ckpt
from ...errors import ConfigError
from .convert import hf_to_megatron, megatron_to_hf
from .lora import lora_from_hf, lora_to_hf
from .model import _tensors

LAYOUT = "megatron.json"
KINDS = ("weight", "exp_avg", "exp_avg_sq", "master")


def shard_name(pp_rank: int, tp_rank: int) -> str:
    return f"shard_pp{pp_rank:02d}_tp{tp_rank:02d}.safetensors"


def _distributed(optimizer) -> bool:
    from .optimizer import DistributedAdamW

    return isinstance(optimizer, DistributedAdamW)


def _params(model) -> dict[str, torch.nn.Parameter]:
    return {**dict(model.gpt.named_parameters()), **model.extra_params()}


def local_tensors(model, optimizer, writer: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's weights and optimizer state as "<kind>/<name>" CPU tensors, and AdamW's step; collective over
    DP (the distributed optimizer's consolidation). Only DP rank 0's result is complete; `writer` False: ({}, 0)
    after taking part in the collective (the other replicas copy nothing)."""
    params = _params(model)
    state = optimizer.consolidated_state(list(params.values())) if _distributed(optimizer) else optimizer.state
    if not writer:
        return {}, 0
    out = {f"weight/{n}": t for n, t in _tensors(model.gpt).items()}  # state-dict names, as load_hf_state's
    out.update({f"weight/{n}": p for n, p in model.extra_params().items()})
    steps = [0]
    for n, p in params.items():
        for kind, t in state.get(p, {}).items():
            if kind == "step":
                steps.append(int(t))
            elif kind in KINDS:
                out[f"{kind}/{n}"] = t
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}, max(steps)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, *, state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. DP replica 0's ranks write their shards into the staging directory that
    global rank 0 commits (renames into place, points `latest` at, prunes), so the step is complete or absent."""
    from megatron.core import parallel_state as ps

    writer = ps.get_data_parallel_rank() == 0
    tensors, adam_step = local_tensors(model, optimizer, writer)
    name = shard_name(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    final = ckpt.step_dir(run_dir, step)

    def write_shards(staging: Path) -> None:  # inside the staging directory's lifetime, on every rank
        dist.barrier()  # staging exists
        if writer:
            save_file(tensors, str(staging / name))
        dist.barrier()  # every shard written

    if dist.get_rank() != 0:
        write_shards(ckpt.staging_dir(final))
        dist.barrier()  # rank 0 committed
        return final
    layout = {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
              "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(), "step": adam_step,
              "distributed_optimizer": _distributed(optimizer),
              "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}
    ckpt.save_training_state(run_dir, step, model_state=None, optimizer_state={"format": "megatron-sharded"},
                             state=state, keep_last=keep_last, files={LAYOUT: json.dumps(layout, indent=1)},
                             write_more=write_shards)
    dist.barrier()
    return final


def _reshard(path: Path, layout: dict, model) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved shard -> HF names -> this rank's slices, per kind ({kind: {name: tensor}})."""
    from megatron.core import parallel_state as ps

    spp, stp = layout["pipeline_parallel"], layout["tensor_parallel"]
    saved = {(p, t): load_file(str(path / shard_name(p, t))) for p in range(spp) for t in range(stp)}
    shape = model.gpt.hf_shape
    out: dict[str, dict[str, torch.Tensor]] = {}
    split = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
             ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())
    for kind in KINDS:
        prefix = f"{kind}/"
        part = lambda keep: {pt: {k[len(prefix):]: v for k, v in f.items() if k.startswith(prefix) and
                                  keep(k[len(prefix):])} for pt, f in saved.items()}
        base = part(lambda n: not n.startswith("head.") and ".lora_" not in n)
        adapter = part(lambda n: ".lora_" in n)
        # the head's trained copy lives on the last stage
        head = {k[len(prefix):]: v for k, v in saved[(spp - 1, 0)].items() if k.startswith(prefix + "head.")}
        mine = {}
        if any(base.values()):  # a frozen backbone (LoRA, frozen RM) has no moments
            mine = hf_to_megatron(megatron_to_hf(base, shape, stp, spp), shape, *split)
        if any(adapter.values()):
            mine.update(lora_from_hf(lora_to_hf(adapter, shape, stp, spp), shape, *split))
        if mine or head:
            out[kind] = {**mine, **head}
    return out


def load_checkpoint(path: Path, model, optimizer) -> None:
    """Weights, AdamW moments and fp32 masters from a sharded checkpoint onto this rank (any TP x PP split)."""
    from megatron.core import parallel_state as ps

    path = Path(path)
    if not (path / LAYOUT).exists():
        raise ConfigError(f"{path}: not an engine=megatron checkpoint (no {LAYOUT}); resume it with the engine that "
                          "wrote it")
    layout = json.loads((path / LAYOUT).read_text())
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (layout["tensor_parallel"], layout["pipeline_parallel"]) == (tp, pp):  # one file: this rank's own
        f = load_file(str(path / shard_name(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())))
        per_kind: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in f.items():
            kind, name = k.split("/", 1)
            per_kind.setdefault(kind, {})[name] = v
    else:
        per_kind = _reshard(path, layout, model)
    weights = per_kind.get("weight", {})
    own = {**_tensors(model.gpt), **model.extra_params()}
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ConfigError(f"{path}: the checkpoint lacks weights for {missing[:5]} (another model?)")
    with torch.no_grad():
        for n, t in own.items():
            if t.shape != weights[n].shape:
                raise ConfigError(f"{path}: {n} is {tuple(weights[n].shape)}, the model expects {tuple(t.shape)}")
            t.copy_(weights[n])
    for group, saved_group in zip(optimizer.param_groups, layout["param_groups"]):
        group.update(saved_group)
    step = torch.tensor(float(layout["step"]))
    per_param = {p: {"step": step.clone(), **{k: per_kind[k][n] for k in KINDS[1:] if n in per_kind.get(k, {})}}
                 for n, p in _params(model).items() if p.requires_grad and n in per_kind.get("exp_avg", {})}
    if _distributed(optimizer):
        optimizer.load_consolidated_state(per_param)
        return
    for p, st in per_param.items():
        optimizer.state[p] = {"step": st["step"], **{k: st[k].to(device=p.device, dtype=p.dtype).clone()
                                                     for k in ("exp_avg", "exp_avg_sq")}}
