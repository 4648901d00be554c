"""Level steering: a trained policy's own attribute vectors, applied in proportion to the requested level.

The SFT stage (`sft.level_steering`) builds, on the trained policy, one vector per attribute at one decoder
layer ℓ (`steerlm.steering.vectors`: mean response activation of the highest-rated labeled turns minus the
lowest-rated) and saves them inside the checkpoint (`level_steering/`). A request that sets attribute a to
level l then also steers the activations:

    h_ℓ ← h_ℓ + Σ_a g · (l_a − c) · v_a

with c the middle of the scale and g the gain (`gain`). Only attributes the request sets explicitly move
the activations; the card's defaults are left to the attribute string alone. Why: at the embedded default's
size the attribute string alone does not move sampled answers (docs/steerability.md rows 8-15), while the
same vectors move them (rows 16-18). Off per call with `SteerableModel.generate(level_steering=False)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

from ..errors import ConfigError
from .ops import Add, LayerSpec, SteeringSpec
from .vectors import AttributeVectors, build_attribute_vectors

LEVEL_DIR, LEVEL_JSON = "level_steering", "level_steering.json"


@dataclass
class LevelSteering:
    vectors: AttributeVectors
    layer: int
    gain: float = 1.0
    center: Union[float, dict] = 2.0  # c, or c_a per attribute (trained vectors: each attribute's training mean)
    positions: str = "all"

    def __post_init__(self):
        self._cache: dict = {}
        for a, by_layer in self.vectors.vectors.items():
            if self.layer not in by_layer:
                raise ConfigError(f"level steering: no {a} vector at layer {self.layer}")

    def center_of(self, attribute: str) -> float:
        return float(self.center[attribute] if isinstance(self.center, dict) else self.center)

    @property
    def attributes(self) -> list[str]:
        return list(self.vectors.vectors)

    def spec(self, requested: Optional[Mapping[str, Optional[float]]]) -> Optional[SteeringSpec]:
        """The spec for one request's explicit attribute levels (None: nothing to steer). Specs are cached by
        their levels, so a batch of rows shares a handful of spec objects (the hooks loop over distinct specs)."""
        moves = tuple(sorted((a, float(v)) for a, v in (requested or {}).items()
                             if v is not None and a in self.vectors.vectors and float(v) != self.center_of(a)))
        if not moves:
            return None
        if moves not in self._cache:
            ops = [Add.from_unnormalized(self.vectors.vectors[a][self.layer], self.gain * (v - self.center_of(a)))
                   for a, v in moves]
            self._cache[moves] = SteeringSpec({self.layer: LayerSpec(ops)}, self.positions)
        return self._cache[moves]

    def describe(self) -> dict:
        return {"layer": self.layer, "gain": self.gain, "center": self.center, "positions": self.positions,
                "attributes": self.attributes, "vectors": self.vectors.meta}

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Into <model_dir>/level_steering/ (vectors.safetensors, steering_vectors.json, level_steering.json)."""
        from ..checkpoint import write_text_atomic

        out = Path(model_dir) / LEVEL_DIR
        self.vectors.save(out)
        desc = {k: v for k, v in self.describe().items() if k != "vectors"}
        write_text_atomic(out / LEVEL_JSON, json.dumps(desc, indent=2) + "\n")  # last: present = complete
        return out

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> Optional["LevelSteering"]:
        """The checkpoint's level steering, or None when it has none."""
        path = Path(model_dir) / LEVEL_DIR
        if not (path / LEVEL_JSON).exists():
            return None
        desc = json.loads((path / LEVEL_JSON).read_text())
        vectors = AttributeVectors.load(path)
        missing = [a for a in desc["attributes"] if a not in vectors.vectors]
        if missing:
            raise ConfigError(f"{path}: {LEVEL_JSON} names {missing}, which have no vectors there")
        vectors.vectors = {a: vectors.vectors[a] for a in desc["attributes"]}  # the saved order (safetensors sorts)
        center = desc["center"]
        center = {a: float(c) for a, c in center.items()} if isinstance(center, dict) else float(center)
        return cls(vectors, int(desc["layer"]), float(desc["gain"]), center,
                   str(desc.get("positions", "all")))


def build_level_steering(model, tokenizer, fmt, schema, labeled: str, attributes, *, layer: Optional[int] = None,
                         gain: float = 1.0, positions: str = "all", skip_ids=(), max_per_side: int = 32,
                         max_length: int = 512, device=None) -> LevelSteering:
    """Vectors of `model` (the trained policy) from the turns of `labeled` (conversations in `skip_ids` left out:
    the held-out split stays unseen), at `layer` (None: the middle decoder layer)."""
    from ..engines.torch_engine import decoder_layers

    layer = len(decoder_layers(model)) // 2 if layer is None else int(layer)
    if gain <= 0:
        raise ConfigError(f"level_steering.gain {gain}: must be > 0 (empty attributes turns level steering off)")
    vectors = build_attribute_vectors(model, tokenizer, fmt, schema, labeled, list(attributes), [layer],
                                      max_per_side=max_per_side, max_length=max_length, skip_ids=set(skip_ids),
                                      device=device if device is not None else next(model.parameters()).device)
    return LevelSteering(vectors, layer, float(gain), (schema.scale_min + schema.scale_max) / 2, positions)


def check_for_run(block, train_sources, steerable) -> Optional[str]:
    """The SFT stage's `level_steering` block, checked before training -> the labeled file the vectors come from
    (None: off)."""
    attributes = list(block.get("attributes") or []) if block else []
    if not attributes:
        return None
    outside = [a for a in attributes if a not in steerable]
    if outside:
        raise ConfigError(f"level_steering.attributes: {outside} are not steerable in this model "
                          f"(steerable: {', '.join(steerable)})")
    if block.get("data") is not None:
        return str(block["data"])
    canonical = [s for s in train_sources if s.get("format") == "canonical"]  # the training data, if one labeled file
    if len(canonical) != 1 or len(train_sources) != 1:
        raise ConfigError("level_steering.data: give the labeled JSONL to build the vectors from (the training "
                          "data is not one canonical file)")
    return str(canonical[0]["path"])


def save_for_run(block, labeled: Optional[str], model_dirs, tokenizer, fmt, schema, *, skip_ids, max_length: int,
                 device) -> Optional[dict]:
    """The SFT stage's `level_steering` block: vectors of the policy just saved in model_dirs[0] (from `labeled`,
    `check_for_run`'s answer), saved into every dir of `model_dirs` (adapter and merged). None when off."""
    import time

    import torch

    from ..models.policy import load_for_generation

    if labeled is None:
        return None
    attributes = list(block.get("attributes"))
    t0 = time.time()
    model = load_for_generation(str(model_dirs[0]), dtype=torch.float32).to(device).eval()
    steering = build_level_steering(model, tokenizer, fmt, schema, labeled, attributes, layer=block.get("layer"),
                                    gain=float(block.get("gain", 1.0)), positions=str(block.get("positions", "all")),
                                    skip_ids=skip_ids, max_per_side=int(block.get("max_per_side", 32)),
                                    max_length=max_length, device=device)
    for d in model_dirs:
        steering.save(d)
    return {**steering.describe(), "seconds": round(time.time() - t0, 1)}


def copy_level_steering(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> bool:
    """A policy trained further from `src_dir` (SteerLM 2.0) keeps its vectors: copied when `src_dir` has them."""
    import shutil

    src = Path(src_dir) / LEVEL_DIR
    if not (src / LEVEL_JSON).exists():
        return False
    shutil.copytree(src, Path(dst_dir) / LEVEL_DIR, dirs_exist_ok=True)
    return True


def merge(a: Optional[SteeringSpec], b: Optional[SteeringSpec]) -> Optional[SteeringSpec]:
    """One spec doing both (a's ops first at a shared layer); positions must agree."""
    if a is None or a.is_noop():
        return b
    if b is None or b.is_noop():
        return a
    if a.positions != b.positions:
        raise ConfigError(f"steering positions {a.positions!r} and level steering positions {b.positions!r} differ; "
                          f"give the request's steering the same positions")
    layers = {i: LayerSpec(list(ls.ops)) for i, ls in a.layers.items()}
    for i, ls in b.layers.items():
        layers[i] = LayerSpec(layers[i].ops + list(ls.ops)) if i in layers else ls
    return SteeringSpec(layers, a.positions)
