"""Global batches (coverage, determinism, length grouping), rank sharding and dynamic padding."""

from __future__ import annotations

import random

import pytest
import torch

from steerlm.data.batching import global_batches, micro_batches, pad_token_batch, rank_slice


def flat(batches):
    return [i for b in batches for i in b]


def skewed_lengths(n=512, seed=0):
    """Mostly short samples with a long tail (like chat data): 85% in 10..60 tokens, 15% in 300..1000."""
    rng = random.Random(seed)
    return [rng.randint(300, 1000) if rng.random() < 0.15 else rng.randint(10, 60) for _ in range(n)]


def padded_tokens(batches, lengths):
    """Σ_b (|b| · max_{i∈b} len_i − Σ_{i∈b} len_i): pad tokens when each batch pads to its longest sample."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


# ------------------------------------------------------------------ global batches
@pytest.mark.parametrize("n, G", [(1, 4), (10, 4), (64, 8), (100, 7), (333, 16)])
@pytest.mark.parametrize("group, shuffle", [(True, True), (False, True), (True, False), (False, False)])
def test_every_index_exactly_once_per_epoch(n, G, group, shuffle):
    lengths = skewed_lengths(n)
    for epoch in range(3):
        batches = global_batches(lengths, G, seed=1, epoch=epoch, group_by_length=group, shuffle=shuffle,
                                 group_window=2)
        assert sorted(flat(batches)) == list(range(n))
        assert len(batches) == -(-n // G)
        assert sorted(len(b) for b in batches) == sorted([G] * (n // G) + ([n % G] if n % G else []))


def test_last_partial_batch_is_kept():
    """10 samples in batches of 4 -> 4, 4, 2 (never dropped); in order without shuffling."""
    lengths = [5] * 10
    plain = global_batches(lengths, 4, seed=0, epoch=0, group_by_length=False, shuffle=False)
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    grouped = global_batches(lengths, 4, seed=0, epoch=0)
    assert sorted(map(len, grouped)) == [2, 4, 4]


def test_order_is_a_pure_function_of_seed_and_epoch():
    lengths = skewed_lengths(200)
    a = global_batches(lengths, 8, seed=3, epoch=1)
    assert a == global_batches(list(lengths), 8, seed=3, epoch=1)
    assert a != global_batches(lengths, 8, seed=3, epoch=2)   # a new epoch reshuffles
    assert a != global_batches(lengths, 8, seed=4, epoch=1)   # so does a new seed
    e0 = global_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)
    e1 = global_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)
    assert e0 != e1 and sorted(flat(e0)) == sorted(flat(e1))
    # the batch composition changes too, not only the batch order
    assert {tuple(sorted(b)) for b in e0} != {tuple(sorted(b)) for b in e1}


def test_does_not_consume_global_random_state():
    lengths = skewed_lengths(50)
    random.seed(0)
    expected = random.random()
    random.seed(0)
    global_batches(lengths, 8, seed=3, epoch=0)
    assert random.random() == expected


def test_length_grouping_reduces_padding():
    lengths = skewed_lengths(512)
    G = 8
    grouped = global_batches(lengths, G, seed=0, epoch=0, group_by_length=True)
    plain = global_batches(lengths, G, seed=0, epoch=0, group_by_length=False)
    pad_g, pad_p = padded_tokens(grouped, lengths), padded_tokens(plain, lengths)
    assert pad_g < 0.25 * pad_p, (pad_g, pad_p)
    # and the grouped epoch is still shuffled at the window scale: not globally sorted by length
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_invalid_batch_size():
    with pytest.raises(ValueError, match="global_batch_size"):
        global_batches([1, 2, 3], 0, seed=0, epoch=0)


# ------------------------------------------------------------------ rank slices
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("size", range(1, 11))
def test_rank_slices_partition_a_global_batch(world, size):
    batch = [100 + i for i in range(size)]
    slices = [rank_slice(batch, r, world) for r in range(world)]
    assert flat(slices) == batch  # contiguous, in rank order, disjoint, complete
    per = -(-size // world)
    assert all(len(s) <= per for s in slices)
    assert len(slices[0]) == per


def test_rank_slice_examples():
    """7 samples over 3 ranks: ceil(7/3) = 3 -> [0:3], [3:6], [6:9]; 4 over 3: 2, 2, 0 (an empty share)."""
    b = list(range(7))
    assert [rank_slice(b, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [rank_slice([0, 1, 2, 3], r, 3) for r in range(3)] == [[0, 1], [2, 3], []]


def test_micro_batches():
    assert micro_batches([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]
    assert micro_batches([], 2) == []


# ------------------------------------------------------------------ padding
def test_right_padding():
    ids, mask = pad_token_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_left_padding():
    ids, mask = pad_token_batch([[1, 2, 3], [4]], pad_id=9, padding_side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_to_multiple_of():
    ids, mask = pad_token_batch([[1, 2, 3], [4, 5]], pad_id=0, pad_to_multiple_of=4)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    ids, _ = pad_token_batch([[1, 2, 3, 4]], pad_id=0, pad_to_multiple_of=4)
    assert ids.shape == (1, 4)


def test_mask_comes_from_lengths_not_from_the_pad_id():
    """A real token equal to pad_id (e.g. pad = eos) stays attended."""
    ids, mask = pad_token_batch([[7, 0, 5], [0]], pad_id=0, padding_side="left")
    assert ids.tolist() == [[7, 0, 5], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_unknown_padding_side_is_an_error():
    with pytest.raises(ValueError):
        pad_token_batch([[1, 2], [3]], pad_id=0, padding_side="rigth")
