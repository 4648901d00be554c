"""When to steer and with what: a subspace gate (FineSteer's SCS, reconstructed) and a mixture of steering
experts (FineSteer's MoSE), both reading a prompt's activation h_q (the last prompt token at one layer).

SCS is not in FineSteer's public code; this is the reconstruction in `research/inference_steering.md`
§1.2 (ours, not the authors' equations):

    U_k = top-k right singular vectors of (H_IR − μ)       H_IR: activations of prompts that need steering
    r(h) = ‖U_kᵀ (h − μ)‖² / ‖h − μ‖²                      the energy ratio, in [0, 1]
    steer  ⇔  r(h) > τ,   τ = the (1 − target_fpr) quantile of r over prompts that do not need steering

MoSE (FineSteer's code, §1.3): prototypes c_1..c_K = k-means cluster means of the observed shifts δ
(clustered after L2 normalisation); a router attends from the query to the prototypes,

    α = softmax( (W_Q h)·(W_K c_j) / √d ),   s(h) = Σ_j α_j c_j  (+ U_res β(h), β a 2-layer MLP, optional)

trained by MSE(s(h_q), δ) with AdamW, full batch, early stopping on a held-out tenth.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError


# ===== SCS: the subspace gate ====================================================================
class SubspaceGate:
    def __init__(self, basis: torch.Tensor, mean: torch.Tensor, threshold: float):
        self.basis, self.mean, self.threshold = basis.float(), mean.float(), float(threshold)  # (H, k), (H,)

    @classmethod
    def fit(cls, steer_acts: torch.Tensor, other_acts: torch.Tensor, k: int = 8, target_fpr: float = 0.05) -> "SubspaceGate":
        """steer_acts (N, H): prompts that need steering; other_acts (M, H): prompts that do not."""
        if len(steer_acts) < 2 or len(other_acts) < 2:
            raise ConfigError("the gate needs at least 2 prompts on each side")
        if not 0 < k <= min(steer_acts.shape):
            raise ConfigError(f"gate subspace rank k={k} must be in 1..{min(steer_acts.shape)}")
        mean = other_acts.float().mean(0)
        _, _, vh = torch.linalg.svd(steer_acts.float() - mean, full_matrices=False)
        gate = cls(vh[:k].T.contiguous(), mean, 0.0)
        gate.threshold = float(torch.quantile(gate.ratio(other_acts), 1.0 - target_fpr))
        return gate

    def ratio(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float() - self.mean
        return ((x @ self.basis) ** 2).sum(-1) / (x ** 2).sum(-1).clamp_min(1e-12)

    def decide(self, h: torch.Tensor) -> torch.Tensor:
        return self.ratio(h) > self.threshold

    def state(self) -> dict:
        return {"basis": self.basis, "mean": self.mean, "threshold": torch.tensor(self.threshold)}


# ===== MoSE: prototypes + router =================================================================
def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding -> (centres (k, D), assignment (N,))."""
    if not 1 <= k <= len(x):
        raise ConfigError(f"k-means: k={k} clusters for {len(x)} points")
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    while len(centres) < k:
        d2 = torch.cdist(x, centres).min(1).values ** 2
        centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return centres, torch.cdist(x, centres).argmin(1)


def calinski_harabasz(x: torch.Tensor, assign: torch.Tensor, k: int) -> float:
    """Between- over within-cluster dispersion, each per degree of freedom (higher: better separated)."""
    mean = x.mean(0)
    between = sum(float((assign == j).sum()) * float(((x[assign == j].mean(0) - mean) ** 2).sum())
                  for j in range(k) if (assign == j).any())
    within = sum(float(((x[assign == j] - x[assign == j].mean(0)) ** 2).sum()) for j in range(k) if (assign == j).any())
    return between / max(k - 1, 1) / (within / max(len(x) - k, 1) + 1e-12)


def prototypes(deltas: torch.Tensor, k: Optional[int] = None, k_range: Sequence[int] = (2, 8), seed: int = 0) -> torch.Tensor:
    """Cluster the L2-normalised shifts; prototypes are the cluster means of the raw shifts. k=None: best CH in k_range."""
    unit = deltas / deltas.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    candidates = [k] if k else [j for j in range(k_range[0], k_range[1] + 1) if j < len(deltas)]
    best = max(((calinski_harabasz(unit, a, j), j, a) for j in candidates for _, a in [kmeans(unit, j, seed=seed)]),
               key=lambda t: t[0])
    _, k, assign = best
    return torch.stack([deltas[assign == j].mean(0) for j in range(k) if (assign == j).any()])


class SteeringRouter(nn.Module):
    def __init__(self, protos: torch.Tensor, attn_dim: int = 64, residual: Optional[torch.Tensor] = None,
                 hidden: int = 256):
        super().__init__()
        H = protos.shape[1]
        self.register_buffer("protos", protos.float())
        self.q, self.k = nn.Linear(H, attn_dim, bias=False), nn.Linear(H, attn_dim, bias=False)
        self.register_buffer("residual", residual.float() if residual is not None else torch.zeros(0, H))  # (r, H)
        self.beta = nn.Sequential(nn.Linear(H, hidden), nn.ReLU(), nn.Linear(hidden, len(self.residual))) \
            if len(self.residual) else None

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        scores = self.q(h.float()) @ self.k(self.protos).T / math.sqrt(self.q.out_features)
        return torch.softmax(scores, -1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.weights(h) @ self.protos
        return s + self.beta(h.float()) @ self.residual if self.beta is not None else s


def train_router(queries: torch.Tensor, deltas: torch.Tensor, *, k: Optional[int] = None, residual_rank: int = 0,
                 attn_dim: int = 64, lr: float = 5e-4, epochs: int = 300, patience: int = 20, seed: int = 0) -> tuple[SteeringRouter, dict]:
    """Fit MoSE on (h_q, δ) pairs -> (router, {k, train_mse, val_mse, epochs})."""
    torch.manual_seed(seed)
    n_val = max(1, len(queries) // 10)
    perm = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:n_val], perm[n_val:]
    protos = prototypes(deltas[tr].float(), k, seed=seed)
    residual = None
    if residual_rank:
        _, _, vh = torch.linalg.svd(deltas[tr].float() - deltas[tr].float().mean(0), full_matrices=False)
        residual = vh[:residual_rank]
    router = SteeringRouter(protos, attn_dim, residual)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=1e-5)
    mse = lambda idx: ((router(queries[idx]) - deltas[idx].float()) ** 2).mean()
    best, best_state, bad, epoch = float("inf"), None, 0, 0
    for epoch in range(1, epochs + 1):
        opt.zero_grad()
        loss = mse(tr)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            v = float(mse(val))
        if v < best - 1e-9:
            best, best_state, bad = v, {n: t.clone() for n, t in router.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    router.load_state_dict(best_state)
    with torch.no_grad():
        info = {"k": len(protos), "train_mse": float(mse(tr)), "val_mse": best, "epochs": epoch}
    return router, info


# ===== save / load ===============================================================================
def save_adaptive(out_dir: str | os.PathLike, *, gate: Optional[SubspaceGate] = None,
                  router: Optional[SteeringRouter] = None, meta: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    from ..checkpoint import atomic_directory

    tensors = {f"gate.{k}": v.contiguous() for k, v in (gate.state() if gate else {}).items()}
    tensors.update({f"router.{k}": v.contiguous() for k, v in (router.state_dict() if router else {}).items()})
    desc = {**(meta or {}), "gate": gate is not None,
            "router": None if router is None else {"attn_dim": router.q.out_features,
                                                   "hidden": router.beta[0].out_features if router.beta else 0}}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "adaptive.safetensors"))
        (tmp / "adaptive.json").write_text(json.dumps(desc, indent=2) + "\n")
    return Path(out_dir)


def load_adaptive(path: str | os.PathLike) -> tuple[Optional[SubspaceGate], Optional[SteeringRouter], dict]:
    from safetensors.torch import load_file

    path = Path(path)
    desc = json.loads((path / "adaptive.json").read_text())
    t = load_file(str(path / "adaptive.safetensors"))
    gate = SubspaceGate(t["gate.basis"], t["gate.mean"], float(t["gate.threshold"])) if desc["gate"] else None
    router = None
    if desc["router"]:
        r = {k[len("router."):]: v for k, v in t.items() if k.startswith("router.")}
        router = SteeringRouter(r["protos"], desc["router"]["attn_dim"], r["residual"] if len(r["residual"]) else None,
                                desc["router"]["hidden"] or 256)
        router.load_state_dict(r)
    return gate, router, desc


# ===== per-prompt specs ==========================================================================
@torch.inference_mode()
def prompt_activations(policy, prompts: Sequence, layer: int, attributes=None, batch_size: int = 8) -> torch.Tensor:
    """h_q: the output of `layer` at each prompt's last token (unsteered, the policy's own template) -> (N, H)."""
    from .hooks import steer

    ids = [policy.prompt_ids(p, attributes) for p in prompts]
    out = []
    for s in range(0, len(ids), batch_size):
        x, mask, _ = policy.left_padded(ids[s:s + batch_size])  # every prompt's last token at -1
        with steer(policy.model, capture_layers=[layer]) as cap:
            policy.model(input_ids=x, attention_mask=mask, use_cache=False)
        out.append(cap[layer][:, -1])
    return torch.cat(out)


def adaptive_specs(h: torch.Tensor, layer: int, coefficient: float, *, router: Optional[SteeringRouter] = None,
                   vector: Optional[torch.Tensor] = None, gate: Optional[SubspaceGate] = None,
                   positions: str = "all") -> list:
    """One spec per prompt: h ← h + coefficient · s(h_q) (router) or · vector (static); None where the gate says no."""
    from .ops import Add, LayerSpec, SteeringSpec

    if (router is None) == (vector is None):
        raise ConfigError("adaptive steering takes a router or a static vector (exactly one)")
    with torch.no_grad():
        vecs = router(h) if router is not None else vector.float().expand(len(h), -1)
        steer_it = gate.decide(h) if gate is not None else torch.ones(len(h), dtype=torch.bool)
    return [SteeringSpec({layer: LayerSpec([Add.from_unnormalized(v, coefficient)])}, positions)
            if bool(on) and coefficient != 0 and float(v.norm()) > 0 else None for v, on in zip(vecs, steer_it)]
