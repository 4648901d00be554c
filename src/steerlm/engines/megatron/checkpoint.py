"""Resumable training state for engine=megatron, stored in HF layout so a run saved at one TP x PP split resumes
at any other.

Weights and AdamW's two moments (exp_avg, exp_avg_sq: tensors shaped like their parameter) are gathered through
the same HF <-> Megatron mapping as the weights, so `checkpoints/step_N/` holds the HF state dict plus HF-named
moments. Resuming slices them back for this rank. Written by global rank 0 (`training.save_state`).
"""

from __future__ import annotations

import torch

from .convert import hf_to_megatron

MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_state(model, optimizer: torch.optim.Optimizer) -> dict:
    """-> {"step", "moments": {exp_avg: {hf name: tensor}, ...}} on global rank 0 ({} elsewhere); collective.
    `model` is a MegatronWrapper: it names its own extra parameters (the RM head) via `extra_params`."""
    named = dict(model.gpt.named_parameters())
    trained = [n for n, p in named.items() if p in optimizer.state]
    steps = [int(st["step"]) for st in optimizer.state.values() if "step" in st]
    step = max(steps) if steps else 0
    # the groups' hyper-parameters: lr is the scheduler's current value, which LambdaLR.load_state_dict does not set
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    out = {"step": step, "param_groups": groups, "moments": {}}
    for key in MOMENTS:
        local = {n: optimizer.state[named[n]][key] for n in trained}
        backbone = model.gather_state(local) if trained else {}  # a frozen backbone has no moments
        extra = {n: optimizer.state[p][key] for n, p in model.extra_params().items() if p in optimizer.state}
        out["moments"][key] = {**(backbone or {}), **model.extra_state(extra)}
    return out if torch.distributed.get_rank() == 0 else {}


def load_optimizer_state(model, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Slice HF-named moments back onto this rank's parameters (any TP x PP split)."""
    from megatron.core import parallel_state as ps

    gpt = model.gpt
    named = dict(gpt.named_parameters())
    step = torch.tensor(float(saved["step"]))
    per_key = {}
    for key in MOMENTS:
        hf = model.backbone_part(saved["moments"][key])
        local = hf_to_megatron(hf, gpt.hf_shape, ps.get_tensor_model_parallel_world_size(),
                               ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                               ps.get_pipeline_model_parallel_rank()) if hf else {}
        local.update(model.extra_part(saved["moments"][key]))
        per_key[key] = local
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(saved_group)
    params = {**named, **model.extra_params()}
    for name, p in params.items():
        if not p.requires_grad or name not in per_key["exp_avg"]:
            continue
        optimizer.state[p] = {"step": step.clone(),
                              **{k: per_key[k][name].to(device=p.device, dtype=p.dtype).clone() for k in MOMENTS}}


def load_model_state(model, state: dict[str, torch.Tensor]) -> None:
    from .model import load_hf_state

    load_hf_state(model.gpt, model.backbone_part(state))
    extra = model.extra_part(state)
    with torch.no_grad():
        for name, p in model.extra_params().items():
            if name in extra:
                p.copy_(extra[name].to(p.dtype))
