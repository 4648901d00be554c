"""Apply steering specs (one per row of a batch, or one for all) and capture activations, by forward hooks
on an HF model's decoder layers; every hook is removed when the `steer` context exits.

Positions. A pre-hook on the decoder stack counts the positions it has seen in this context, so a
layer knows the absolute position t of each of its T inputs whether it runs a whole sequence or one
cached decoding step. Row r's positions t < prompt_lengths[r] are its prompt, the rest are generated
tokens (left-padded generation: prompt_lengths = the padded prompt width for every row).

Continuous batching (rows join and leave between decoding steps) calls `set_batch` on the yielded
context whenever the rows change: each row then has its own position, advanced by every forward.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..engines.torch_engine import decoder_layers
from ..errors import ConfigError
from .ops import SteeringSpec

Specs = Union[None, SteeringSpec, Sequence[Optional[SteeringSpec]]]


def decoder_stack(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return base.get_decoder() if hasattr(base, "get_decoder") else base


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


class Capture:
    """Post-steering layer outputs: `capture[layer]` -> (B, T_total, H) fp32 on the CPU."""

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self._parts: dict[int, list[torch.Tensor]] = defaultdict(list)

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not captured (captured: {self.layers})")
        return torch.cat(self._parts[layer], dim=1)


class SteerContext(Capture):
    """What `steer` yields: the capture, plus `set_batch` for a batch whose rows change between forwards."""

    def __init__(self, layers: Sequence[int], set_batch):
        super().__init__(layers)
        self._set_batch = set_batch

    def set_batch(self, specs: Specs, prompt_lengths: Optional[Sequence[int]] = None,
                  positions: Optional[Sequence[int]] = None) -> None:
        """The rows of the next forwards: specs (one per row, each one the context was opened with, or None;
        or one for all rows), row r's prompt is its positions < prompt_lengths[r], and its next input token
        is at position positions[r] (each forward then advances every row by its length)."""
        self._set_batch(specs, prompt_lengths, positions)


@contextlib.contextmanager
def steer(model: nn.Module, specs: Specs = None, *, batch_size: Optional[int] = None,
          prompt_lengths: Optional[Sequence[int]] = None, capture_layers: Sequence[int] = ()) -> Iterator[SteerContext]:
    """specs: None, one SteeringSpec for every row, or one (or None) per row of the batch."""
    layers = decoder_layers(model)
    per_row = specs if isinstance(specs, (list, tuple)) else None
    if per_row is not None and batch_size is not None and len(per_row) != batch_size:
        raise ConfigError(f"{len(per_row)} steering specs for a batch of {batch_size} rows")
    distinct = {id(s): s for s in (per_row if per_row is not None else [specs]) if s is not None and not s.is_noop()}
    for s in distinct.values():
        s.check(len(layers), hidden_size(model))
        if s.positions != "all" and prompt_lengths is None:
            raise ConfigError(f"steering positions={s.positions!r} needs the prompt lengths of the batch")
    state = {"seen": 0, "offset": 0, "positions": None, "row_offset": None}

    def set_batch(row_specs, lengths, positions):
        # built when the rows change, not on every layer of every decoding step
        rows = row_specs if isinstance(row_specs, (list, tuple)) else None
        if rows is not None and any(s is not None and not s.is_noop() and id(s) not in distinct for s in rows):
            raise ConfigError("set_batch: a row's steering spec is not one the steer() context was opened with")
        state["row_of"] = {k: None if rows is None else torch.tensor([r is s for r in rows]) for k, s in distinct.items()}
        state["lengths"] = torch.as_tensor(lengths) if lengths is not None else None
        state["positions"] = torch.as_tensor(positions) if positions is not None else None

    capture = SteerContext(capture_layers, set_batch)
    set_batch(per_row, prompt_lengths, None)  # fixed rows: one shared position counter

    def count_positions(_module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        state["offset"] = state["seen"]
        state["seen"] += int(x.shape[1])
        state["row_offset"] = state["positions"]  # per-row positions (set_batch) or None
        if state["positions"] is not None:
            state["positions"] = state["positions"] + int(x.shape[1])

    def layer_hook(index: int):
        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            B, T, _ = h.shape
            for key, spec in distinct.items():
                ls = spec.layers.get(index)
                if ls is None or ls.is_noop():
                    continue
                rows = state["row_of"][key]
                mask = (torch.ones(B, dtype=torch.bool) if rows is None else rows).to(h.device).unsqueeze(1).expand(B, T)
                if spec.positions != "all":
                    first = state["offset"] if state["row_offset"] is None else state["row_offset"].to(h.device).unsqueeze(1)
                    t = first + torch.arange(T, device=h.device).unsqueeze(0)
                    is_prompt = t < state["lengths"].to(h.device).unsqueeze(1)
                    mask = mask & (is_prompt if spec.positions == "prompt" else ~is_prompt)
                h = torch.where(mask.unsqueeze(-1), ls.apply(h), h)
            if index in capture.layers:
                capture._parts[index].append(h.detach().float().cpu())
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    active = sorted({i for s in distinct.values() for i in s.layers} | set(capture_layers))
    for i in capture_layers:
        if not 0 <= i < len(layers):
            raise ConfigError(f"capture layer {i}: the model has layers 0..{len(layers) - 1}")
    handles = [decoder_stack(model).register_forward_pre_hook(count_positions, with_kwargs=True)] if active else []
    try:
        handles += [layers[i].register_forward_hook(layer_hook(i)) for i in active]
        yield capture
    finally:
        for handle in handles:
            handle.remove()
