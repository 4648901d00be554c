"""Length-grouped global batches, rank sharding and dynamic padding.

The order of samples is a pure function of (seed, epoch), independent of world size, so a run
with 1 process and a run with N processes see the same global batches; each rank takes a
contiguous slice of every global batch. Resuming only needs (epoch, step).

Length grouping: shuffle, cut into windows of `group_window` global batches, sort each window by
length, cut it into global batches, then shuffle the batch order. Batches hold similar lengths,
so dynamic padding (to the longest sample in a micro-batch) wastes little, while the epoch order
stays random at the window scale.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch


def global_batches(lengths: Sequence[int], global_batch_size: int, *, seed: int, epoch: int,
                   group_by_length: bool = True, group_window: int = 16, shuffle: bool = True) -> list[list[int]]:
    """Indices of every global batch of one epoch. The last batch may be smaller (never dropped)."""
    if global_batch_size < 1:
        raise ValueError("global_batch_size must be >= 1")
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        window = global_batch_size * group_window
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda j: -lengths[j])]
    batches = [order[b:b + global_batch_size] for b in range(0, len(order), global_batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def rank_slice(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Contiguous share of a global batch for one rank (may be empty for a short last batch)."""
    per = math.ceil(len(batch) / world_size)
    return list(batch[rank * per:(rank + 1) * per])


def micro_batches(indices: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    return [list(indices[i:i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]


def pad_token_batch(sequences: Sequence[Sequence[int]], pad_id: int, *, padding_side: str = "right",
                    pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence (rounded up to a multiple) -> (input_ids, attention_mask), (B, T)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(s) for s in sequences)
    T = int(math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        n = len(s)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[i, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
