"""Sequence packing: several conversations per row, attention kept inside each conversation.

A packed row is the concatenation of its sequences; `position_ids` restart at 0 for each one and
no attention mask is passed. transformers then builds a block-diagonal causal mask from the
position restarts (`masking_utils.find_packed_sequence_indices`) for sdpa/eager attention, and
flash-attention kernels run padding-free varlen attention from the same position ids. Rows in a
micro-batch are padded at the end; the padding restarts its positions too, so it is its own
"sequence" that no real token attends to, and its labels are masked. A micro-batch of one row
also carries flash-attention's varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`), which
flash kernels and `models.packed_attention` turn into per-conversation attention without a mask.

Packing is best-fit decreasing (BFD): longest sequence first, into the row with the least room
that still fits it. Deterministic for a given list of lengths.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from ..models.packed_attention import cu_seq_lens

IGNORE = -100


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bins of indices whose lengths sum to <= capacity each (input order inside a bin)."""
    if capacity < 1:
        raise ValueError("pack capacity must be >= 1")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} sequences are longer than the pack capacity {capacity} (first: index "
                         f"{too_long[0]}, {lengths[too_long[0]]} tokens)")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin id)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return [sorted(b) for b in bins]


def collate_packed(rows: Sequence[Sequence[tuple[list[int], list[bool]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of (ids, trained-mask) sequences -> input_ids, position_ids, loss_mask (B, T), padded at the end."""
    flat = []
    for row in rows:
        ids, pos, mask = [], [], []
        for seq_ids, seq_mask in row:
            if seq_mask and seq_mask[0]:
                raise ValueError("a sequence's first token cannot be trained (it has no context)")
            ids += seq_ids
            pos += range(len(seq_ids))
            mask += seq_mask
        flat.append((ids, pos, mask))
    T = max(len(ids) for ids, _, _ in flat)
    B = len(flat)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for r, (ids, pos, mask) in enumerate(flat):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        position_ids[r, :n] = torch.tensor(pos)
        position_ids[r, n:] = torch.arange(T - n)  # the padding is a separate "sequence"
        loss_mask[r, :n] = torch.tensor(mask)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask}
    if B == 1:  # one row: the flash-attention varlen kwargs (models.packed_attention uses them with sdpa)
        lens = [len(seq_ids) for seq_ids, _ in rows[0]]
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens(lens)
        batch["max_length_q"] = batch["max_length_k"] = max(lens)
    return batch


def collate_padded(seqs: Sequence[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One sequence per row, right-padded, with an attention mask (the unpacked baseline)."""
    T = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for r, (ids, mask) in enumerate(seqs):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        loss_mask[r, :len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
