"""AdamW with fp32 master weights and its state sharded over the data-parallel replicas: what Megatron's
distributed optimizer does (ZeRO stage 1, Rajbhandari et al. 2020), for engine=megatron.

Memory per parameter for a bf16 model, of which this optimizer holds the 12 bytes of fp32 state:

    plain AdamW on bf16 weights      2 (weights) + 2 (grads) + 4 (two bf16 moments)      =  8 bytes, no master copy
    this, DP replicas = N            2 + 2 + (4 master + 4 exp_avg + 4 exp_avg_sq) / N  =  4 + 12/N bytes
                                     (+ 4/N during the step: fp32 copies of the owned gradients)

Each parameter (this rank's TP/PP shard of it) is owned by one DP rank, assigned greedily by size so the
ranks hold about the same number of elements. A step: the gradients are already averaged over DP (engine.
finish_grads); the owner runs torch's AdamW on the fp32 master copy (θ ← θ − lr·(m̂/(√v̂+ε) + λθ)), writes it
back in the model's dtype, and broadcasts it to the other replicas. Megatron reduce-scatters the gradients and
all-gathers the weights instead: the same bytes on the wire, in two collectives rather than an all-reduce and
broadcasts. An fp32 parameter is its own master (no copy), so an fp32 model only gains the sharding.

Checkpoints stay HF-named and split-independent (engines/megatron/checkpoint.py): `consolidated_state` sends
every owner's moments (and fp32 masters) to DP rank 0, and `load_consolidated_state` keeps this rank's share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

STATE_KEYS = ("exp_avg", "exp_avg_sq")


class DistributedAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float = 1e-8):
        super().__init__(param_groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0))
        from megatron.core import parallel_state as ps

        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_ranks = dist.get_process_group_ranks(self.dp_group)  # global rank of each DP rank
        params = [p for g in self.param_groups for p in g["params"]]
        load = [0] * self.dp_size
        self.owner: dict[torch.Tensor, int] = {}
        for p in sorted(params, key=lambda p: -p.numel()):  # largest first: even to within one tensor
            r = min(range(self.dp_size), key=lambda i: (load[i], i))
            self.owner[p] = r
            load[r] += p.numel()
        self.master: dict[torch.Tensor, torch.Tensor] = {}  # owned parameter -> its fp32 master (itself if fp32)
        inner_groups = []
        for g in self.param_groups:
            owned = [p for p in g["params"] if self.owner[p] == self.dp_rank]
            for p in owned:
                self.master[p] = p if p.dtype == torch.float32 else p.detach().float().clone()
            hyper = {k: v for k, v in g.items() if k != "params"}
            inner_groups.append({**hyper, "params": [self.master[p] for p in owned]})
        self.inner = torch.optim.AdamW(inner_groups, lr=lr, betas=tuple(betas), eps=eps)
        self.held_elements, self.total_elements = load[self.dp_rank], sum(load)
        self.has_master = any(p.dtype != torch.float32 for p in params)  # the same on every rank of the model

    def describe(self) -> str:
        copies = "fp32 master weights" if self.has_master else "fp32 weights (their own masters)"
        replicas = f"{self.dp_size} data-parallel replica{'s' if self.dp_size > 1 else ''}"
        return (f"distributed optimizer: AdamW state for {self.held_elements:,} of {self.total_elements:,} "
                f"parameters on this rank ({replicas}), {copies}")

    def state_dict(self):
        raise NotImplementedError("DistributedAdamW's state is sharded: save it with engines/megatron/checkpoint.py")

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "DistributedAdamW.step takes no closure"
        for group, inner in zip(self.param_groups, self.inner.param_groups):  # the scheduler sets the outer lr
            inner.update({k: v for k, v in group.items() if k != "params"})
        for p, m in self.master.items():
            m.grad = None if p.grad is None else (p.grad if m is p else p.grad.float())
        self.inner.step()
        for p, m in self.master.items():
            if m is not p:
                p.copy_(m)
                m.grad = None
        self._broadcast_from_owners()

    def _broadcast_from_owners(self, bucket_elements: int = 2 ** 26) -> None:
        """Every replica receives the parameters its peers updated, in flat buckets (one owner, one dtype)."""
        if self.dp_size == 1:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        for r in range(self.dp_size):
            for dtype in sorted({p.dtype for p in params}, key=str):
                mine = [p for p in params if self.owner[p] == r and p.dtype == dtype]
                bucket, n = [], 0
                for p in mine + [None]:
                    if p is not None:
                        bucket.append(p)
                        n += p.numel()
                    if bucket and (p is None or n >= bucket_elements):
                        flat = torch.cat([q.detach().reshape(-1) for q in bucket])
                        dist.broadcast(flat, src=self.dp_ranks[r], group=self.dp_group)
                        offset = 0
                        for q in bucket:
                            q.data.copy_(flat[offset:offset + q.numel()].view_as(q))
                            offset += q.numel()
                        bucket, n = [], 0

    # --- checkpoints: every parameter's state on DP rank 0, and back
    def consolidated_state(self, params: list[torch.Tensor]) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """-> {param: {exp_avg, exp_avg_sq, master?, step}} for `params` on DP rank 0 ({} elsewhere); collective
        over DP. One tensor in flight at a time: no rank holds more than its own share plus one parameter."""
        out = {}
        keys = (*STATE_KEYS, "master") if self.has_master else STATE_KEYS
        device = next(iter(self.owner)).device  # nccl reduces only CUDA tensors
        step = torch.tensor([max([float(self.inner.state[m]["step"]) for m in self.master.values()
                                  if "step" in self.inner.state.get(m, {})], default=0.0)], device=device)
        if self.dp_size > 1:
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.dp_group)
        for p in params:
            if p not in self.owner:
                continue
            entry = {}
            for key in keys:
                owner = self.owner[p]
                if owner == self.dp_rank:
                    m = self.master[p]
                    t = m.detach().float() if key == "master" else self.inner.state[m][key] \
                        if key in self.inner.state.get(m, {}) else torch.zeros_like(m, dtype=torch.float32)
                    if owner != 0:
                        dist.send(t.contiguous(), dst=self.dp_ranks[0], group=self.dp_group)
                elif self.dp_rank == 0:
                    t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                    dist.recv(t, src=self.dp_ranks[owner], group=self.dp_group)
                if self.dp_rank == 0:
                    entry[key] = t.detach().cpu().clone()
            if self.dp_rank == 0:
                out[p] = {**entry, "step": torch.tensor(float(step))}
        return out

    def load_consolidated_state(self, per_param: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Every rank passes every parameter's saved state; the owner keeps its share (no communication). Call it
        after loading the weights: a master with nothing saved restarts from its (just loaded) parameter."""
        for p, m in self.master.items():
            if m is not p:
                m.copy_(p.detach().float())
        for p, st in per_param.items():
            if self.owner.get(p) != self.dp_rank:
                continue
            m = self.master[p]
            if m is not p and "master" in st:
                m.copy_(st["master"].to(device=m.device, dtype=torch.float32))
            self.inner.state[m] = {"step": st["step"].clone(),
                                   **{k: st[k].to(device=m.device, dtype=torch.float32).clone() for k in STATE_KEYS}}
