"""Steering operations on the residual stream, and the declarative spec that places them on layers.

With u = v / ‖v‖ (every op stores a unit direction) and h a hidden state at the output of a decoder
layer (steerllm's semantics):

    Add(v, scale)               h ← h + scale · u
    ProjectionCap(v, lo, hi)    p = h·u;  h ← h + (clamp(p, lo, hi) − p) · u
    Ablation(v, scale)          h ← h + (scale − 1) (h·u) · u      (0 removes the component, 1 is a no-op)

A `LayerSpec` is an ordered list of ops for one layer; a `SteeringSpec` maps layer index -> LayerSpec
and says which positions it steers: `prompt` (the prompt tokens), `generated` (the response tokens:
each generated token's own position) or `all`. Specs save as `steering.json` + `vectors.safetensors`.
The math runs in fp32 and is cast back to the hidden state's dtype.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import ConfigError

POSITIONS = ("all", "prompt", "generated")
SPEC_JSON, VECTORS = "steering.json", "vectors.safetensors"


def _unit(vector, what: str) -> torch.Tensor:
    v = torch.as_tensor(vector, dtype=torch.float32).detach().flatten().cpu()
    norm = float(v.norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise ConfigError(f"{what}: the steering vector must be finite and non-zero (norm {norm})")
    return v if abs(norm - 1.0) < 1e-6 else v / norm  # already unit (a loaded spec): keep its exact bits


def _finite(value, what: str) -> Optional[float]:
    """A scale or bound as float; NaN / inf would poison the activations (and a server's shared KV cache)."""
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return v


@dataclass
class Add:
    vector: torch.Tensor
    scale: float = 1.0

    def __post_init__(self):
        self.vector = _unit(self.vector, "Add")
        self.scale = _finite(self.scale, "Add: scale")

    @classmethod
    def from_unnormalized(cls, vector, coefficient: float = 1.0) -> "Add":
        """h ← h + coefficient · vector (the norm folds into the scale)."""
        v = torch.as_tensor(vector, dtype=torch.float32)
        return cls(v, coefficient * float(v.norm()))

    def is_noop(self) -> bool:
        return self.scale == 0.0

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scale * self.vector.to(h.device)


@dataclass
class ProjectionCap:
    vector: torch.Tensor
    min: Optional[float] = None
    max: Optional[float] = None

    def __post_init__(self):
        self.vector = _unit(self.vector, "ProjectionCap")
        self.min, self.max = _finite(self.min, "ProjectionCap: min"), _finite(self.max, "ProjectionCap: max")
        if self.min is None and self.max is None:
            raise ConfigError("ProjectionCap needs min, max or both")

    def is_noop(self) -> bool:
        return False

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        u = self.vector.to(h.device)
        p = h @ u
        return h + (p.clamp(min=self.min, max=self.max) - p).unsqueeze(-1) * u


@dataclass
class Ablation:
    vector: torch.Tensor
    scale: float = 0.0

    def __post_init__(self):
        self.vector = _unit(self.vector, "Ablation")
        self.scale = _finite(self.scale, "Ablation: scale")

    def is_noop(self) -> bool:
        return self.scale == 1.0

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        u = self.vector.to(h.device)
        return h + (self.scale - 1.0) * (h @ u).unsqueeze(-1) * u


Op = Union[Add, ProjectionCap, Ablation]
OP_TYPES = {"add": Add, "projection_cap": ProjectionCap, "ablation": Ablation}


@dataclass
class LayerSpec:
    ops: list = field(default_factory=list)

    def is_noop(self) -> bool:
        return all(op.is_noop() for op in self.ops)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states -> steered, in h's dtype; the ops run in order, in fp32."""
        x = h.float()
        for op in self.ops:
            if not op.is_noop():
                x = op.apply(x)
        return x.to(h.dtype)


@dataclass
class SteeringSpec:
    layers: dict = field(default_factory=dict)   # layer index -> LayerSpec
    positions: str = "all"

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ConfigError(f"steering positions {self.positions!r}: choose one of {', '.join(POSITIONS)}")
        self.layers = {int(k): v if isinstance(v, LayerSpec) else LayerSpec(list(v)) for k, v in self.layers.items()}

    @classmethod
    def add(cls, layer: int, vector, scale: float, positions: str = "all") -> "SteeringSpec":
        return cls({layer: LayerSpec([Add(vector, scale)])}, positions)

    def is_noop(self) -> bool:
        return all(ls.is_noop() for ls in self.layers.values())

    def check(self, n_layers: int, hidden_size: int) -> None:
        for i, ls in self.layers.items():
            if not 0 <= i < n_layers:
                raise ConfigError(f"steering layer {i}: the model has layers 0..{n_layers - 1}")
            for op in ls.ops:
                if op.vector.numel() != hidden_size:
                    raise ConfigError(f"steering layer {i}: a {type(op).__name__} vector has {op.vector.numel()} "
                                      f"entries, the model's hidden size is {hidden_size}")

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """-> (JSON-able description, {key: vector}) with vectors referenced by key."""
        layers, vectors = {}, {}
        for i, ls in sorted(self.layers.items()):
            ops = []
            for k, op in enumerate(ls.ops):
                key = f"layer{i}.op{k}"
                vectors[key] = op.vector.contiguous()
                name = next(n for n, t in OP_TYPES.items() if isinstance(op, t))
                params = {"scale": op.scale} if hasattr(op, "scale") else {"min": op.min, "max": op.max}
                ops.append({"type": name, "vector": key, **params})
            layers[str(i)] = ops
        return {"positions": self.positions, "layers": layers}, vectors

    def save(self, out_dir: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from ..checkpoint import atomic_directory

        desc, vectors = self.to_dict()
        with atomic_directory(out_dir) as tmp:
            save_file(vectors, str(tmp / VECTORS))
            (tmp / SPEC_JSON).write_text(json.dumps(desc, indent=2) + "\n")
        return Path(out_dir)

    @classmethod
    def from_dict(cls, desc: dict, vectors: dict[str, torch.Tensor], where: str = "steering spec") -> "SteeringSpec":
        layers = {}
        for i, ops in desc.get("layers", {}).items():
            built = []
            for k, o in enumerate(ops):
                kind = OP_TYPES.get(o.get("type"))
                if kind is None:
                    raise ConfigError(f"{where}: layer {i} op {k}: unknown type {o.get('type')!r}; "
                                      f"choose {', '.join(OP_TYPES)}")
                if o.get("vector") not in vectors:
                    raise ConfigError(f"{where}: layer {i} op {k}: vector {o.get('vector')!r} is not in {VECTORS}")
                params = {p: o[p] for p in ("scale", "min", "max") if p in o}
                built.append(kind(vectors[o["vector"]], **params))
            layers[int(i)] = LayerSpec(built)
        return cls(layers, desc.get("positions", "all"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringSpec":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / SPEC_JSON).exists():
            raise FileNotFoundError(f"{path}: not a steering spec (no {SPEC_JSON})")
        return cls.from_dict(json.loads((path / SPEC_JSON).read_text()), load_file(str(path / VECTORS)), str(path))
