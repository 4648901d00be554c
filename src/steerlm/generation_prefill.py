"""Prefill for the continuous-batching loop (steerlm.generation), sharing computed prompt prefixes.

An evaluate sweep asks each prompt at 15 attribute levels: the 15 prompts differ only in the label
string at their end (`<extra_id_2>helpfulness:4,...\\n`, ~22 tokens of a 64-516-token prompt), so most of
the prefill is the same tokens again. Causal attention makes the keys/values of a prefix independent of
what follows it, so a prefix is computed once (stage A) and each prompt then runs only its own suffix
on top of it (stage B). `PrefixStore` keeps the recent stage-A sequences, so prompts admitted later
(continuous batching admits a few at a time) reuse them too.

Prefixes are shared only between rows with the same steering at prompt positions (a spec steering
"all"/"prompt" positions changes the prompt's keys and values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

MIN_SHARED = 16  # tokens: a shorter common prefix is not worth a second forward


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


@dataclass
class Prefix:
    key: object  # steering identity at prompt positions (None: unsteered)
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (kv_heads, len(ids), head_dim)


class PrefixStore:
    """The last `size` stage-A sequences (prompt prefixes and whole prompts), newest first."""

    def __init__(self, size: int = 8):  # sorted admission puts prompts that share a prefix next to each other
        self.size, self.entries = size, []

    def best(self, key, ids: Sequence[int]) -> tuple[Optional[Prefix], int]:
        best, n = None, 0
        for e in self.entries:
            k = lcp(e.ids, ids) if e.key == key else 0
            if k > n:
                best, n = e, k
        return best, n

    def add(self, entry: Prefix) -> None:
        self.entries = [entry] + [e for e in self.entries if e.ids != entry.ids or e.key != entry.key][:self.size - 1]


def families(seqs: Sequence[Sequence[int]], keys: Sequence[object]) -> list[tuple[list[int], Optional[int]]]:
    """Sorted sequences -> [(indices, shared prefix length or None for one sequence computed whole)], the
    split that prefills the fewest tokens: a run sharing p tokens costs p + sum(n - p); it is split where
    neighbours share the least when its parts cost less (e.g. one system prompt, then per-prompt prefixes)."""
    def cost(groups):
        return sum(len(seqs[g[0]]) if p is None else p + sum(len(seqs[i]) - p for i in g) for g, p in groups)

    def split(run: list[int]) -> list[tuple[list[int], Optional[int]]]:
        if len(run) == 1:
            return [(run, None)]
        links = [lcp(seqs[a], seqs[b]) if keys[a] == keys[b] else 0 for a, b in zip(run, run[1:])]
        p = min(min(links), *(len(seqs[i]) - 1 for i in run))
        parts, start = [], 0
        for k, link in enumerate(links):
            if link <= min(links):
                parts.append(run[start:k + 1])
                start = k + 1
        parts.append(run[start:])
        best = [g for part in parts for g in split(part)] if len(parts) > 1 else [(run, p)]
        if p >= MIN_SHARED and cost([(run, p)]) <= cost(best):
            return [(run, p)]
        return best if len(parts) > 1 else [([i], None) for i in run]

    return split(list(range(len(seqs)))) if seqs else []


@dataclass
class Prefilled:
    """One prefilled row: its first-token logits and where its KV lies (segments of a prefill cache)."""

    logits: torch.Tensor
    segments: list  # [(kv per layer, batch row, first column, length)], in token order


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(list(s))
            mask[r, width - len(s):] = 1
    return ids, mask


def layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of an HF DynamicCache, across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def by_length(lengths: Sequence[int], max_tokens: int, slack: float = 0.25) -> list[list[int]]:
    """Indices cut into forwards of similar lengths (longest first): padding <= slack of a forward's width,
    rows x width <= max_tokens (at least one row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    parts: list[list[int]] = []
    for i in order:
        if parts and (len(parts[-1]) + 1) * lengths[parts[-1][0]] <= max_tokens \
                and lengths[parts[-1][0]] - lengths[i] <= slack * lengths[parts[-1][0]]:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def prefill(model, prompts: Sequence[list[int]], keys: Sequence[object], store: PrefixStore, *, pad_id: int,
            forward: Callable, set_rows: Callable, max_tokens: int = 4096) -> list[Prefilled]:
    """Prefill `prompts` (keys[r]: row r's steering key) -> one Prefilled per prompt, in forwards of similar
    lengths of <= max_tokens padded tokens.

    forward(ids, mask, positions, cache) -> last-position logits; set_rows(rows, width, offset): point
    the steering context at these rows (row r's r-th prompt, every position a prompt position).
    """
    from transformers.cache_utils import DynamicCache

    n = len(prompts)
    source: list[Optional[tuple]] = [None] * n  # (Prefix or stage-A row, shared length)
    for r, ids in enumerate(prompts):
        entry, k = store.best(keys[r], ids)
        if min(k, len(ids) - 1) >= MIN_SHARED:
            source[r] = (entry, min(k, len(ids) - 1))
    # rows without a stored prefix: neighbours (sorted by ids) sharing >= MIN_SHARED tokens form families whose
    # common prefix is computed once; a row alone is computed whole
    todo = sorted((r for r in range(n) if source[r] is None), key=lambda r: (str(keys[r]), prompts[r]))
    stage_a: list[tuple[list[int], object]] = []  # (ids, key)
    first_of: dict[int, int] = {}  # row -> its stage-A row (computed whole)
    for rows, shared in families([prompts[r] for r in todo], [keys[r] for r in todo]):
        if shared is None:
            first_of[todo[rows[0]]] = len(stage_a)
            stage_a.append((prompts[todo[rows[0]]], keys[todo[rows[0]]]))
        else:
            for k in rows:
                source[todo[k]] = (len(stage_a), shared)
            stage_a.append((prompts[todo[rows[0]]][:shared], keys[todo[rows[0]]]))

    out: list[Optional[Prefilled]] = [None] * n
    whole = {a: r for r, a in first_of.items()}  # stage-A row -> the prompt it is, computed whole
    made: dict[int, Prefix] = {}
    for part in by_length([len(seq) for seq, _ in stage_a], max_tokens):
        seqs = [stage_a[a][0] for a in part]
        ids, mask = left_pad(seqs, pad_id)
        cache = DynamicCache()
        set_rows([next(r for r in range(n) if keys[r] == stage_a[a][1]) for a in part], ids.shape[1], 0)
        logits = forward(ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0), cache)
        kv, width = layers_kv(cache), ids.shape[1]
        for b, (a, seq) in enumerate(zip(part, seqs)):
            first = width - len(seq)
            made[a] = Prefix(stage_a[a][1], list(seq), [(k[b, :, first:].clone(), v[b, :, first:].clone()) for k, v in kv])
            store.add(made[a])
            if a in whole:
                out[whole[a]] = Prefilled(logits[b], [(kv, b, first, len(seq))])
    for r in range(n):
        if source[r] is not None and isinstance(source[r][0], int):
            source[r] = (made[source[r][0]], source[r][1])

    # stage B: each row's suffix on top of its shared prefix (left-padded prefixes, then suffixes)
    rest = [r for r in range(n) if out[r] is None]
    for part in by_length([len(prompts[r]) - source[r][1] for r in rest], max_tokens):
        rows = [rest[b] for b in part]
        shared = [source[r][1] for r in rows]
        suffix_ids, suffix_mask = left_pad([prompts[r][p:] for r, p in zip(rows, shared)], pad_id)
        P = max(shared)
        past_mask = torch.zeros((len(rows), P), dtype=torch.long)
        cache = DynamicCache()
        for layer in range(len(source[rows[0]][0].kv)):
            k0 = source[rows[0]][0].kv[layer][0]
            keys_t = torch.zeros((len(rows), k0.shape[0], P, k0.shape[2]), dtype=k0.dtype, device=k0.device)
            values_t = torch.zeros_like(keys_t)
            for b, (r, p) in enumerate(zip(rows, shared)):
                k, v = source[r][0].kv[layer]
                keys_t[b, :, P - p:], values_t[b, :, P - p:] = k[:, :p], v[:, :p]
            cache.update(keys_t, values_t, layer)
        for b, p in enumerate(shared):
            past_mask[b, P - p:] = 1
        positions = (torch.tensor(shared).unsqueeze(1) + suffix_mask.cumsum(-1) - 1).masked_fill(suffix_mask == 0, 0)
        set_rows(rows, P + suffix_ids.shape[1], P)
        logits = forward(suffix_ids, torch.cat([past_mask, suffix_mask], 1), positions, cache)
        kv, width = layers_kv(cache), P + suffix_ids.shape[1]
        for b, (r, p) in enumerate(zip(rows, shared)):
            s = len(prompts[r]) - p
            out[r] = Prefilled(logits[b], [(kv, b, P - p, p), (kv, b, width - s, s)])
    return out
