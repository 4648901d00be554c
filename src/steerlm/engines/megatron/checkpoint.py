"""Resumable training state for engine=megatron, stored in HF layout so a run saved at one TP x PP split resumes
at any other.

Weights and AdamW's two moments (exp_avg, exp_avg_sq: tensors shaped like their parameter; with the distributed
optimizer also its fp32 master weights) are gathered through the same HF <-> Megatron mapping as the weights, so
`checkpoints/step_N/` holds the HF state dict plus HF-named moments. Resuming slices them back for this rank.
Written by global rank 0 (`training.save_state`).
"""

from __future__ import annotations

import torch

from .convert import hf_to_megatron

MOMENTS = ("exp_avg", "exp_avg_sq")


def _distributed(optimizer) -> bool:
    from .optimizer import DistributedAdamW

    return isinstance(optimizer, DistributedAdamW)


def optimizer_state(model, optimizer: torch.optim.Optimizer) -> dict:
    """-> {"step", "param_groups", "moments": {exp_avg: {hf name: tensor}, ...}} on global rank 0 ({} elsewhere);
    collective. The distributed optimizer first brings every owner's state to DP rank 0 and adds its fp32 master
    weights as a third entry, "master". `model` is a MegatronWrapper: it names its own extra parameters (the RM
    head) via `extra_params`."""
    named, extra = dict(model.gpt.named_parameters()), model.extra_params()
    if _distributed(optimizer):
        state = optimizer.consolidated_state([*named.values(), *extra.values()])  # on DP rank 0
        keys = (*MOMENTS, "master") if optimizer.has_master else MOMENTS
        trained = [n for n, p in named.items() if p in optimizer.owner]  # the same on every rank
    else:
        state, keys = optimizer.state, MOMENTS
        trained = [n for n, p in named.items() if p in state]
    steps = [int(st["step"]) for st in state.values() if "step" in st]
    step = max(steps) if steps else 0
    # the groups' hyper-parameters: lr is the scheduler's current value, which LambdaLR.load_state_dict does not set
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    out = {"step": step, "param_groups": groups, "moments": {}}
    for key in keys:
        local = {n: state[named[n]][key] for n in trained if named[n] in state}
        backbone = model.gather_state(local) if trained else {}  # a frozen backbone has no moments
        head = {n: state[p][key] for n, p in extra.items() if p in state}
        out["moments"][key] = {**(backbone or {}), **model.extra_state(head)}
    return out if torch.distributed.get_rank() == 0 else {}


def load_optimizer_state(model, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Slice HF-named moments (and fp32 masters, when saved) back onto this rank's parameters (any TP x PP split;
    the distributed optimizer keeps its own share)."""
    from megatron.core import parallel_state as ps

    gpt = model.gpt
    step = torch.tensor(float(saved["step"]))
    per_key = {}
    for key in saved["moments"]:
        hf = model.backbone_part(saved["moments"][key])
        local = hf_to_megatron(hf, gpt.hf_shape, ps.get_tensor_model_parallel_world_size(),
                               ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                               ps.get_pipeline_model_parallel_rank()) if hf else {}
        local.update(model.extra_part(saved["moments"][key]))
        per_key[key] = local
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(saved_group)
    per_param = {p: {"step": step.clone(), **{k: v[name] for k, v in per_key.items()}}
                 for name, p in {**dict(gpt.named_parameters()), **model.extra_params()}.items()
                 if p.requires_grad and name in per_key["exp_avg"]}
    if _distributed(optimizer):
        optimizer.load_consolidated_state(per_param)
        return
    for p, st in per_param.items():
        optimizer.state[p] = {"step": st["step"], **{k: st[k].to(device=p.device, dtype=p.dtype).clone()
                                                     for k in MOMENTS}}


def load_model_state(model, state: dict[str, torch.Tensor]) -> None:
    from .model import load_hf_state

    load_hf_state(model.gpt, model.backbone_part(state))
    extra = model.extra_part(state)
    with torch.no_grad():
        for name, p in model.extra_params().items():
            if name in extra:
                p.copy_(extra[name].to(p.dtype))
