"""KV-cache slots for the continuous-batching loop (steerlm.generation): preallocated per-row buffers that a
decoding step writes in place (HF's DynamicCache grows by `torch.cat`, copying the whole cache every step)."""

from __future__ import annotations

import torch


def make_slot_cache(n_layers: int):
    """A `transformers` Cache whose layers write into preallocated (slots, kv_heads, columns, head_dim) buffers."""
    from transformers.cache_utils import Cache, DynamicLayer

    class SlotLayer(DynamicLayer):
        """One decoder layer: writes this step's key/value in place and returns the live rows' columns."""

        def __init__(self, cache: "SlotCache", index: int):
            super().__init__()
            self.cache, self.index, self.is_initialized = cache, index, True

        def update(self, key_states, value_states, *args, **kwargs):
            c = self.cache
            keys, values = c.keys[self.index], c.values[self.index]
            keys[c.rows, :, c.write_at] = key_states[:, :, 0]
            values[c.rows, :, c.write_at] = value_states[:, :, 0]
            return keys[:c.n, :, :c.width], values[:c.n, :, :c.width]

        def get_seq_length(self) -> int:  # the columns before this step's token (HF sizes its masks with it)
            return self.cache.width - 1

    class SlotCache(Cache):
        def __init__(self):
            super().__init__(layers=[SlotLayer(self, i) for i in range(n_layers)])
            self.keys: list[torch.Tensor] = []
            self.values: list[torch.Tensor] = []
            self.finite: list[int] = []  # per slot: its columns below this hold finite numbers
            self.n = self.width = 0
            self.rows = self.write_at = None

        def allocate(self, like: torch.Tensor, slots: int, columns: int) -> None:
            # torch.empty: memory is touched only where rows reach (`ensure_finite`), not slots x columns
            shape = (slots, like.shape[1], columns, like.shape[3])
            self.keys = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(n_layers)]
            self.values = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(n_layers)]
            self.finite = [0] * slots

        def ensure_finite(self, first: int, end: int, width: int) -> None:
            """Slots [first, end) hold finite numbers in their columns < width: a masked column still enters the
            attention as 0 x value, so uninitialised memory (NaN) there would leak into the output. Zeroes
            ahead by 16 columns, one op per run of slots at the same mark (rows admitted together), and never
            a column below a slot's mark, where its row's tokens are."""
            s = first
            while s < end:
                lo, e = self.finite[s], s + 1
                while e < end and self.finite[e] == lo:
                    e += 1
                if lo < width:
                    hi = min(self.keys[0].shape[2], width + 16)
                    for t in (*self.keys, *self.values):
                        t[s:e, :, lo:hi].zero_()
                    self.finite[s:e] = [hi] * (e - s)
                s = e

        def place(self, slot: int, segments) -> None:
            """A prefilled row -> slot: segments [(kv per layer, batch row, first column, length)] fill columns 0, 1, ..."""
            at = 0
            for kv, row, first, length in segments:
                for i, (k, v) in enumerate(kv):
                    self.keys[i][slot, :, at:at + length] = k[row, :, first:first + length]
                    self.values[i][slot, :, at:at + length] = v[row, :, first:first + length]
                at += length
            self.finite[slot] = max(self.finite[slot], at)

        def release(self, first: int, end: int) -> None:
            """Slots [first, end) are free. Their next rows zero every column they attend beyond their own tokens
            again: a masked column still enters attention as 0 x value, and a previous row's values need not be
            finite (a server runs whatever requests send)."""
            self.finite[first:end] = [0] * (end - first)

        def move(self, src: int, dst: int, length: int) -> None:
            for t in (*self.keys, *self.values):
                t[dst, :, :length] = t[src, :, :length]
            self.finite[dst] = max(self.finite[dst], length)

        def close(self) -> None:
            """Free the buffers now: the layers refer back to the cache, so it is a cycle only the GC collects."""
            self.keys, self.values, self.layers = [], [], []

        def step(self, lens: torch.Tensor, width: int) -> None:
            """The next forward feeds one token per live row, written at column lens[r]; attention sees `width` columns."""
            self.n, self.width = int(lens.shape[0]), width
            self.rows, self.write_at = torch.arange(self.n, device=lens.device), lens

    return SlotCache()
