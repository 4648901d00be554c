"""Sequence packing: BFD bins, collation, packed == unpacked loss, and the startup packing probe."""

from __future__ import annotations

import random

import pytest
import torch

from steerlm.attributes import get_schema
from steerlm.data.packing import collate_packed, collate_padded, pack_sequences
from steerlm.data.sources import load_mixture
from steerlm.errors import ConfigError
from steerlm.losses import next_token_nll
from steerlm.models.packed_attention import PACKED_SDPA, register
from steerlm.models.reward_model import load_tokenizer
from steerlm.sft_template import SFTFormat, encode_conversation
from steerlm.stages.sft import check_packing_support
from steerlm.stages.sft_data import plan_step


def test_pack_sequences_places_every_index_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_sequences(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.05 + 1  # BFD is near-optimal on random lengths


def test_pack_sequences_best_fit_and_errors():
    assert pack_sequences([6, 4, 5, 5], 10) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="longer than the pack capacity"):
        pack_sequences([3, 11], 10)


def test_collate_packed_restarts_positions_and_masks_padding():
    b = collate_packed([[([1, 2, 3], [False, True, True]), ([4, 5], [False, True])], [([6], [False])]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert b["loss_mask"].tolist() == [[False, True, True, False, True], [False] * 5]
    with pytest.raises(ValueError, match="first token"):
        collate_packed([[([1, 2], [True, True])]], pad_id=0)


def test_plan_step_gives_every_rank_the_same_number_of_micro_batches():
    lengths = [100, 90, 80, 10, 10]
    plan = plan_step(list(range(5)), lengths, packing=True, pack_length=128, world_size=2, micro_batch_size=1)
    assert len(plan[0]) == len(plan[1])
    assert sorted(i for rank in plan for mb in rank for row in mb for i in row) == list(range(5))
    single = plan_step(list(range(5)), lengths, packing=False, pack_length=128, world_size=3, micro_batch_size=2)
    assert {len(r) for r in single} == {1} and sum(len(row) for r in single for mb in r for row in mb) == 5


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_model_dir))
    convs, _ = load_mixture([{"format": "helpsteer2", "path": "data/helpsteer2/helpsteer2_train_first100.jsonl"}],
                            get_schema("steerlm9"))
    enc = [encode_conversation(SFTFormat("nemo"), tok, get_schema("steerlm9"), c["system"], c["turns"]) for c in convs[:8]]
    enc = [e for e in enc if len(e[0]) < 700][:5]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return tok, model, enc


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_packed_loss_equals_unpacked_loss(tiny, attn):
    tok, model, enc = tiny
    model.set_attn_implementation(register() if attn == PACKED_SDPA else attn)
    with torch.no_grad():
        packed_nll, packed_n = next_token_nll(model, collate_packed([enc], tok.pad_token_id))
        padded_nll, padded_n = next_token_nll(model, collate_padded(enc, tok.pad_token_id))
        alone = [next_token_nll(model, collate_padded([e], tok.pad_token_id)) for e in enc]
    assert packed_n == padded_n == sum(n for _, n in alone) == sum(sum(m) for _, m in enc)
    assert float(packed_nll) == pytest.approx(float(padded_nll), rel=1e-5)
    assert float(packed_nll) == pytest.approx(sum(float(x) for x, _ in alone), rel=1e-5)
    model.set_attn_implementation("sdpa")


def test_packing_probe_accepts_llama_and_rejects_a_model_that_ignores_positions(tiny):
    tok, model, _ = tiny
    check_packing_support(model, torch.device("cpu"), tok.pad_token_id)

    class IgnoresPositions(torch.nn.Module):  # attends across the packed boundary, like a model without packing support
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, input_ids, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, **kw)

    with pytest.raises(ConfigError, match="packing=false"):
        check_packing_support(IgnoresPositions(model), torch.device("cpu"), tok.pad_token_id)


def test_packed_sdpa_runs_one_causal_call_per_conversation(tiny, monkeypatch):
    """A single packed row goes through per-conversation causal sdpa (no mask); several rows fall back to sdpa."""
    import transformers.integrations.sdpa_attention as sdpa_mod

    tok, model, enc = tiny
    model.set_attn_implementation(register())
    calls = []
    real = sdpa_mod.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        calls.append((q.shape[2], mask is None, kw.get("is_causal")))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", spy)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        one_row = collate_packed([enc[:3]], tok.pad_token_id)
        assert one_row["cu_seq_lens_q"].tolist() == [0, len(enc[0][0]), len(enc[0][0]) + len(enc[1][0]),
                                                    sum(len(e[0]) for e in enc[:3])]
        next_token_nll(model, one_row)
        assert calls == [(len(e[0]), True, True) for e in enc[:3]] * layers
        calls.clear()
        next_token_nll(model, collate_packed([enc[:2], enc[2:3]], tok.pad_token_id))
        assert len(calls) == layers and not calls[0][1]  # two rows: one masked sdpa call per layer
    model.set_attn_implementation("sdpa")
