"""Trained level vectors (`sft.level_steering.train`): the level steering's vectors learned with the SFT loss.

Level steering (`steerlm.steering.levels`) adds h_ℓ ← h_ℓ + Σ_a (l_a − c) · v_a at one decoder layer ℓ for the
levels a request sets. Built after training as a mean difference of activations, v_a is a guess: it moves sampled
answers, but nothing makes a held-out answer most likely under its own level (docs/steerability.md rows 17-18:
conditioning strength reversed for verbosity). Here V = (v_a) is a parameter of the SFT objective instead:

    L = (1 / N_B) · Σ_c Σ_{t ∈ trained(c)} −log p_θ,V(x_t | x_<t, c's label strings; h_ℓ + Σ_a (ℓ_{c,a} − c) v_a)

where ℓ_{c,a} is the label of the turn that token t belongs to (0 offset for an attribute the turn lacks or that
attribute dropout removed) and c_a the centre (`center`): the scale's midpoint, or the attribute's mean label over
the training turns (`train_mean`). Why the mean: OASST's humor labels are mostly 0, so around the midpoint nearly
every token has offset −2 and v_a also learns a bias ("typical text is likelier at low levels"); around the mean
the offsets average 0 and v_a carries only what the label adds. Maximum likelihood under the level is exactly what conditioning strength measures,
and inference applies the same shift (gain 1, every position), so train and test see one model.

V starts at the mean difference of the base model's activations (`init: mean_difference`) or at 0, and has its own
learning rate (`lr`): hidden states at the middle layer of the embedded default have coordinates ~0.4-0.7, far
from what 16 AdamW steps at LoRA's 1e-3 can reach. torch engine (single, ddp): V is a parameter of the wrapped
model, so DDP averages its gradient and resumable checkpoints carry it; it never reaches the exported weights.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .levels import LevelSteering
from .vectors import AttributeVectors

MODULE_NAME = "steerlm_level_vectors"


class TrainedLevels(nn.Module):
    """V (A, H) at decoder layer `layer`; `set_offsets` gives the (B, T, A) level offsets ℓ − c of the next forward."""

    def __init__(self, attributes: Sequence[str], hidden: int, layer: int, centers: Sequence[float],
                 init: Optional[torch.Tensor] = None):
        super().__init__()
        self.attributes, self.layer, self.centers = list(attributes), int(layer), [float(c) for c in centers]
        self.weight = nn.Parameter(torch.zeros(len(self.attributes), hidden) if init is None
                                   else init.detach().float().clone())
        self.offsets: Optional[torch.Tensor] = None

    def attach(self, model: nn.Module) -> None:
        """Register as a submodule of `model` (so optimizers, DDP and checkpoints see V) and hook its layer."""
        from ..engines.torch_engine import decoder_layers

        setattr(model, MODULE_NAME, self)
        decoder_layers(model)[self.layer].register_forward_hook(self._hook)

    def set_offsets(self, offsets: Optional[torch.Tensor]) -> None:
        self.offsets = offsets

    def _hook(self, _module, _args, output):
        if self.offsets is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        shift = (self.offsets.to(hidden.device, torch.float32) @ self.weight.float()).to(hidden.dtype)
        hidden = hidden + shift
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def level_steering(self, meta: Optional[dict] = None, gain: float = 1.0) -> LevelSteering:
        """The inference form: LevelSteering with v_a = V[a] at every position. Gain 1 applies what training applied;
        a larger gain extrapolates the learned shift (sft.level_steering.inference_gain)."""
        w = self.weight.detach().float().cpu()
        vectors = AttributeVectors({a: {self.layer: w[k].clone()} for k, a in enumerate(self.attributes)},
                                   {"method": "trained with the SFT loss (sft.level_steering.train)", **(meta or {})})
        return LevelSteering(vectors, self.layer, float(gain), dict(zip(self.attributes, self.centers)), "all")

    def norms(self) -> dict[str, float]:
        return {a: float(self.weight[k].detach().norm()) for k, a in enumerate(self.attributes)}


def token_offsets(mask: Sequence[bool], turn_labels: Sequence[Optional[Mapping]], attributes: Sequence[str],
                  centers: Sequence[float]) -> torch.Tensor:
    """(T, A) offsets ℓ_a − c_a for one encoded conversation. `turn_labels`: the labels of its assistant turns in order
    (after attribute dropout). Token t takes the labels of the assistant turn it leads up to or belongs to: turn k
    owns the tokens after turn k−1's trained span through the end of its own trained span (its user message, its
    attribute string, its response), so a single-turn prompt is shifted by its own level everywhere, as at
    inference. If the trained spans do not pair one to one with the assistant turns, every token takes the last
    turn's labels."""
    T, A = len(mask), len(attributes)
    out = torch.zeros(T, A)
    rows = [[float(lab[a]) - c if lab and lab.get(a) is not None else 0.0 for a, c in zip(attributes, centers)]
            for lab in turn_labels]
    if not rows:
        return out
    ends = [t for t in range(T) if mask[t] and (t + 1 == T or not mask[t + 1])]  # last token of each trained span
    if len(ends) != len(rows):
        out[:] = torch.tensor(rows[-1])
        return out
    start = 0
    for end, row in zip(ends, rows):
        out[start:end + 1] = torch.tensor(row)
        start = end + 1
    if start < T:
        out[start:] = torch.tensor(rows[-1])
    return out


def batch_offsets(rows: list[list[int]], offsets: Sequence[torch.Tensor], packing: bool, length: int) -> torch.Tensor:
    """(B, T, A) offsets laid out as `make_batch` lays out the tokens (packed rows concatenated; padding 0)."""
    A = offsets[rows[0][0]].shape[1]
    out = torch.zeros(len(rows), length, A)
    for r, row in enumerate(rows):
        parts = [offsets[i] for i in row] if packing else [offsets[row[0]]]
        flat = torch.cat(parts, 0)
        out[r, :flat.shape[0]] = flat
    return out


def train_label_mean(examples: Sequence[dict], attribute: str, default: float) -> float:
    """Mean label of `attribute` over the labeled assistant turns of the training examples (default: none)."""
    values = [float(t["labels"][attribute]) for ex in examples for t in ex["turns"]
              if t["role"] == "assistant" and t.get("labels") and t["labels"].get(attribute) is not None]
    return sum(values) / len(values) if values else default


def setup_for_run(block, labeled: Optional[str], model: nn.Module, tokenizer, fmt, schema, *, strategy: str,
                  contrast: bool, skip_ids, max_length: int, device, train_examples=()) -> Optional[TrainedLevels]:
    """`level_steering.train`: V initialised (`init`) and attached to `model` (LoRA already applied, not yet wrapped).
    None when level steering is off or not trained."""
    from ..engines.torch_engine import decoder_layers
    from ..errors import ConfigError
    from .levels import build_level_steering

    if block is not None and block.get("inference_gain") is not None and not block.get("train", False):
        raise ConfigError("level_steering.inference_gain is the gain of trained vectors (train=true); "
                          "post-hoc vectors use level_steering.gain")
    if labeled is None or not block.get("train", False):
        return None
    if strategy not in ("single", "ddp"):
        raise ConfigError(f"level_steering.train: engine.strategy={strategy} is not supported (single or ddp; "
                          f"or level_steering.train=false for vectors built after training)")
    if contrast:
        raise ConfigError("level_steering.train with contrast.weight > 0: not supported (set one of them off)")
    if str(block.get("positions", "all")) != "all":
        raise ConfigError("level_steering.train: positions must be all (training shifts every token of a turn)")
    attributes = list(block.get("attributes"))
    n_layers = len(decoder_layers(model))
    layer = n_layers // 2 if block.get("layer") is None else int(block.get("layer"))
    if not 0 <= layer < n_layers:
        raise ConfigError(f"level_steering.layer {layer}: the model has decoder layers 0..{n_layers - 1}")
    midpoint = (schema.scale_min + schema.scale_max) / 2
    center = str(block.get("center", "midpoint"))
    if center == "midpoint":
        centers = [midpoint] * len(attributes)
    elif center == "train_mean":  # a skewed label centred at the midpoint would make v_a a bias (see the module doc)
        centers = [train_label_mean(train_examples, a, midpoint) for a in attributes]
    else:
        raise ConfigError(f"level_steering.center={center!r}: midpoint or train_mean")
    hidden = int(model.config.hidden_size)
    init = str(block.get("init", "mean_difference"))
    weight = None
    if init == "mean_difference":  # the base model's vectors at the configured gain: what `train: false` would give
        model.to(device)
        built = build_level_steering(model, tokenizer, fmt, schema, labeled, attributes, layer=layer,
                                     gain=float(block.get("gain", 1.0)), skip_ids=skip_ids,
                                     max_per_side=int(block.get("max_per_side", 32)), max_length=max_length,
                                     device=device)
        weight = torch.stack([built.gain * built.vectors.vectors[a][layer] for a in attributes])
    elif init != "zeros":
        raise ConfigError(f"level_steering.init={init!r}: mean_difference or zeros")
    trained = TrainedLevels(attributes, hidden, layer, centers, weight)
    trained.attach(model)
    return trained
