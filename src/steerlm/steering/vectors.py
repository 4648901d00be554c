"""Attribute steering vectors from RM-labeled data: what "more verbose" means, in activations.

For attribute a and decoder layer ℓ, over the assistant turns of a stage-2 labeled file:

    v_a,ℓ = mean_{y ∈ high} h̄_ℓ(x, y) − mean_{y ∈ low} h̄_ℓ(x, y)

h̄_ℓ(x, y) is the output of layer ℓ averaged over the response tokens of y (teacher-forced after its
conversation, rendered without an attribute string). `high` / `low` are the top / bottom `fraction`
of turns by the RM's score for a (the stage-2 `scores`; the `labels` where a turn has no score for a, e.g.
human labels kept by `keep_human_labels`).
Steering with `Add.from_unnormalized(v, c)` then moves h by c times the high-low difference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..attributes import AttributeSchema
from ..data.packing import collate_padded
from ..errors import ConfigError, DataError
from ..sft_template import SFTFormat
from .hooks import steer
from .ops import Add, LayerSpec, SteeringSpec

VECTORS_JSON, VECTORS_FILE = "steering_vectors.json", "vectors.safetensors"


def scored_turns(path: str, schema: AttributeSchema, attribute: str, skip_ids=frozenset()) -> list[dict]:
    """[{system, turns (before it), response, score}] for every assistant turn of a labeled JSONL rated on `attribute`
    (conversations whose id is in `skip_ids` left out)."""
    if attribute not in schema.attributes:
        raise ConfigError(f"attribute {attribute!r} is not in schema {schema.name!r} ({', '.join(schema.attributes)})")
    schema_file = Path(path).parent / "attribute_schema.json"
    if schema_file.exists():
        schema.require_same(AttributeSchema.load(Path(path).parent), what="the model", other_what=str(path))
    out = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
                turns = row["turns"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(str(path), line_no, "turns", f"not a labeled conversation ({e})") from None
            if skip_ids and row.get("id") in skip_ids:
                continue
            for k, t in enumerate(turns):
                rating = None
                if t.get("role") == "assistant":  # the RM's raw score where it wrote one, else the (human) label
                    rating = (t.get("scores") or {}).get(attribute)
                    rating = (t.get("labels") or {}).get(attribute) if rating is None else rating
                if rating is not None:
                    out.append({"system": row.get("system"), "turns": [{"role": p["role"], "content": p["content"]}
                                                                       for p in turns[:k]],
                                "response": t["content"], "score": float(rating)})
    return out


@torch.inference_mode()
def response_mean_activations(model, tokenizer, fmt: SFTFormat, schema: AttributeSchema, examples: Sequence[dict],
                              layers: Sequence[int], *, batch_size: int = 8, max_length: int = 512,
                              device=torch.device("cpu")) -> tuple[dict[int, torch.Tensor], int]:
    """{layer: (N, H)} mean response-token outputs of each layer, and how many examples were over max_length
    (skipped, counted: never cut)."""
    from ..stages.steerlm2_data import encode_response

    rows, skipped = [], 0
    for ex in examples:
        ids, mask = encode_response(fmt, tokenizer, schema, {"system": ex["system"], "turns": ex["turns"],
                                                             "attributes": None}, ex["response"], conditioned=False)
        if len(ids) > max_length:
            skipped += 1
        else:
            rows.append((ids, mask))
    means: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for s in range(0, len(rows), batch_size):
        b = {k: v.to(device) for k, v in collate_padded(rows[s:s + batch_size], tokenizer.pad_token_id).items()}
        with steer(model, capture_layers=layers) as cap:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        m = b["loss_mask"].float().cpu().unsqueeze(-1)
        for i in layers:
            means[i].append((cap[i] * m).sum(1) / m.sum(1).clamp_min(1))
    return {i: torch.cat(v) if v else torch.empty(0) for i, v in means.items()}, skipped  # all skipped: the caller says so


@dataclass
class AttributeVectors:
    """v[attribute][layer] (fp32) with how they were made; saves as vectors.safetensors + steering_vectors.json."""
    vectors: dict = field(default_factory=dict)  # attribute -> {layer: (H,)}
    meta: dict = field(default_factory=dict)

    def spec(self, attribute: str, layer: int, coefficient: float, positions: str = "all") -> SteeringSpec:
        """h ← h + coefficient · v_{attribute, layer} at `positions`."""
        if attribute not in self.vectors:
            raise ConfigError(f"no steering vector for {attribute!r}; these vectors have {', '.join(self.vectors)}")
        if layer not in self.vectors[attribute]:
            raise ConfigError(f"no {attribute} vector at layer {layer}; built for layers {sorted(self.vectors[attribute])}")
        if coefficient == 0:
            return SteeringSpec({}, positions)
        return SteeringSpec({layer: LayerSpec([Add.from_unnormalized(self.vectors[attribute][layer], coefficient)])},
                            positions)

    def save(self, out_dir: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from ..checkpoint import atomic_directory

        flat = {f"{a}.layer{i}": v.contiguous() for a, by_layer in self.vectors.items() for i, v in by_layer.items()}
        with atomic_directory(out_dir) as tmp:
            save_file(flat, str(tmp / VECTORS_FILE))
            (tmp / VECTORS_JSON).write_text(json.dumps(self.meta, indent=2) + "\n")
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttributeVectors":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / VECTORS_JSON).exists():
            raise FileNotFoundError(f"{path}: no {VECTORS_JSON}; build vectors with recipes/build_steering_vectors.py")
        vectors: dict = {}
        for key, v in load_file(str(path / VECTORS_FILE)).items():
            attribute, layer = key.rsplit(".layer", 1)
            vectors.setdefault(attribute, {})[int(layer)] = v
        return cls(vectors, json.loads((path / VECTORS_JSON).read_text()))


def build_attribute_vectors(model, tokenizer, fmt: SFTFormat, schema: AttributeSchema, labeled: str,
                            attributes: Sequence[str], layers: Optional[Sequence[int]], *, fraction: float = 0.25,
                            max_per_side: int = 64, min_per_side: int = 4, batch_size: int = 8, max_length: int = 512,
                            skip_ids=frozenset(), device=torch.device("cpu")) -> AttributeVectors:
    from ..engines.torch_engine import decoder_layers

    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    if not 0 < fraction <= 0.5:
        raise ConfigError(f"fraction {fraction}: the high and low sets are the top / bottom fraction, in (0, 0.5]")
    result = AttributeVectors(meta={"labeled": str(labeled), "schema": schema.name, "layers": layers,
                                    "site": "decoder layer output, mean over response tokens", "fraction": fraction,
                                    "attributes": {}})
    for a in attributes:
        turns = sorted(scored_turns(labeled, schema, a, skip_ids), key=lambda t: t["score"])
        k = min(int(len(turns) * fraction), max_per_side)
        low, high = turns[:k], turns[len(turns) - k:]
        if k < min_per_side or low[-1]["score"] >= high[0]["score"]:
            raise ConfigError(f"{labeled}: {len(turns)} turns rated on {a}: too few, or too little spread, for "
                              f"high and low sets of >= {min_per_side} (top/bottom fraction {fraction})")
        acts_hi, skip_hi = response_mean_activations(model, tokenizer, fmt, schema, high, layers, batch_size=batch_size,
                                                     max_length=max_length, device=device)
        acts_lo, skip_lo = response_mean_activations(model, tokenizer, fmt, schema, low, layers, batch_size=batch_size,
                                                     max_length=max_length, device=device)
        if min(len(high) - skip_hi, len(low) - skip_lo) < min_per_side:
            raise ConfigError(f"{labeled}: after skipping turns over max_length={max_length}, fewer than {min_per_side} "
                              f"high or low {a} turns are left (raise max_length)")
        result.vectors[a] = {i: acts_hi[i].mean(0) - acts_lo[i].mean(0) for i in layers}
        result.meta["attributes"][a] = {
            "turns_rated": len(turns), "high": len(high) - skip_hi, "low": len(low) - skip_lo,
            "skipped_over_max_length": skip_hi + skip_lo,
            "high_score_range": [high[0]["score"], high[-1]["score"]], "low_score_range": [low[0]["score"], low[-1]["score"]],
            "norms": {str(i): round(float(v.norm()), 4) for i, v in result.vectors[a].items()}}
    return result


def spec_from_config(steering, n_layers: int) -> Optional[SteeringSpec]:
    """A recipe's `steering` block -> one spec: `spec` (a saved spec dir) or `vectors` + `attribute` +
    `coefficient` (+ `layer`, null: the middle one; `positions`). Nothing set: None (no steering)."""
    if steering is None or (not steering.get("spec") and not steering.get("vectors")):
        return None
    if steering.get("spec") and steering.get("vectors"):
        raise ConfigError("steering: give spec=<dir> or vectors=<dir> with attribute/coefficient, not both")
    if steering.get("spec"):
        return SteeringSpec.load(steering["spec"])
    if not steering.get("attribute"):
        raise ConfigError("steering.vectors needs steering.attribute (e.g. verbosity)")
    layer = n_layers // 2 if steering.get("layer") is None else int(steering["layer"])
    return AttributeVectors.load(steering["vectors"]).spec(steering["attribute"], layer,
                                                           float(steering.get("coefficient", 1.0)),
                                                           steering.get("positions", "all"))
