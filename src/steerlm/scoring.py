"""The batched reward scorer: a stage-1 RM checkpoint applied to many conversations, fast and exact.

Used by labeling (stage 2), SteerLM 2.0 and the steerability evaluation. How it stays correct and
fast:

- The RM's own template, schema and trained heads come from its checkpoint (`steerlm_reward.json`,
  `attribute_schema.json`), so callers cannot score with a different format than it was trained on.
- Inputs are sorted by length and cut into batches under a token budget (`batch_tokens` = rows x
  padded length), so padding is only the difference between neighbours; results come back in input
  order. `torch.inference_mode`, bf16 on GPU.
- Over-length inputs are never silently truncated: `over_length` = error | skip (score None,
  counted) | truncate_left (drop tokens from the left, keeping the rated response and the
  label-start token the head reads; counted).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .attributes import AttributeSchema
from .data.batching import pad_token_batch
from .engines.torch_engine import cpu_has_bf16
from .errors import ConfigError, DataError
from .models.reward_model import load_reward_model, load_tokenizer
from .templates import tokenize_rm_input

RM_CARD = "steerlm_reward.json"
OVER_LENGTH = ("error", "skip", "truncate_left")
GPU_BATCH_TOKENS, CPU_BATCH_TOKENS = 8192, 2048  # default padded-token budgets per forward (see RewardScorer)


@dataclass
class ScoreStats:
    inputs: int = 0
    scored: int = 0
    skipped_over_length: int = 0
    truncated_left: int = 0
    from_cache: int = 0      # inputs whose features came from the reward stage's cache (no forward)
    tokens: int = 0          # non-pad tokens run through the model
    padded_tokens: int = 0   # rows x padded length actually computed
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tokens_per_s"] = round(self.tokens / self.seconds, 1) if self.seconds else None
        d["padding_fraction"] = round(1 - self.tokens / self.padded_tokens, 4) if self.padded_tokens else 0.0
        return d

    def add(self, other: "ScoreStats") -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


def ids_digest(ids) -> str:
    """The content address of one RM input: sha1 of its token ids as int64 (feature-cache keys)."""
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def token_budget_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int = 256) -> list[list[int]]:
    """Indices sorted by length (longest first) cut so rows x longest <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > batch_tokens or len(cur) >= max_rows):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class RewardScorer:
    """Score (system, turns) conversations with a steerlm RM checkpoint.

    Args:
        rm_path: a stage-1 output `model/` directory.
        device: "auto" | "cpu" | "cuda[:n]".
        precision: "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32" (the parameter dtype).
        batch_tokens: padded-token budget per forward; None: 8192 on GPU, 2048 on CPU (on a CPU, per-token
            throughput drops with batch size — activations fall out of cache — so small sorted batches win:
            scripts/bench_label.py measured ~600 tokens/s at 1-2k vs ~480 at 8k for SmolLM2-135M on 2 cores).
        max_length: token limit; default the RM's training max_length.
        over_length: error | skip | truncate_left.
        tensor_parallel, pipeline_parallel, sequence_parallel: run the RM on Megatron-core split over TP x PP ranks
            (engine=megatron; its process groups must be up). tensor_parallel None: the HF model on one device.
    """

    def __init__(self, rm_path: str, *, device: str = "auto", precision: str = "auto", batch_tokens: Optional[int] = None,
                 max_length: Optional[int] = None, over_length: str = "error", tensor_parallel: Optional[int] = None,
                 pipeline_parallel: int = 1, sequence_parallel: bool = False):
        if precision not in ("auto", "bf16", "fp32"):  # never run an unknown precision as fp32 without a word
            raise ConfigError(f"engine.precision={precision!r}: expected one of auto | bf16 | fp32")
        if over_length not in OVER_LENGTH:
            raise ConfigError(f"unknown over_length {over_length!r}; choose one of {OVER_LENGTH}")
        card_path = Path(rm_path) / RM_CARD
        if not card_path.exists():
            raise FileNotFoundError(f"{rm_path}: not a steerlm reward model (no {RM_CARD}); train one with recipes/train_reward.py")
        self.card = json.loads(card_path.read_text())
        self.schema = AttributeSchema.load(rm_path)
        self.template = self.card["template"]
        self.trained_attributes = list(self.card["trained_attributes"])
        self.max_length = int(max_length or self.card["max_length"])
        self.over_length = over_length
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_tokens = int(batch_tokens or (GPU_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS))
        native_bf16 = self.device.type == "cuda" or cpu_has_bf16()  # emulated bf16 is ~50x slower (AVX2 CPUs)
        dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and native_bf16) else torch.float32
        self.tokenizer = load_tokenizer(rm_path)
        self.model = load_reward_model(rm_path, self.schema, pad_token_id=self.tokenizer.pad_token_id, dtype=dtype,
                                       require_rm=True)
        if tensor_parallel is not None:
            from .engines.megatron.reward_model import MegatronRewardModel

            self.model = MegatronRewardModel(self.model, tp=tensor_parallel, pp=pipeline_parallel,
                                             sequence_parallel=sequence_parallel, dtype=dtype)
        self.model = self.model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        self.dtype = dtype

    def tokenize(self, system: Optional[str], turns: Sequence[dict], where: str, stats: ScoreStats) -> Optional[list[int]]:
        """RM input ids under the over-length policy; None means skipped."""
        ids = tokenize_rm_input(self.template, self.tokenizer, system, turns)
        if len(ids) <= self.max_length:
            return ids
        if self.over_length == "error":
            raise DataError(where, None, "length", f"{len(ids)} tokens > max_length {self.max_length} "
                                                   "(over_length=skip or truncate_left to handle such inputs)")
        if self.over_length == "skip":
            stats.skipped_over_length += 1
            return None
        stats.truncated_left += 1
        return ids[-self.max_length:]  # keeps the rated response's end and the token the head reads

    def reuse_features(self, cache_dir: str) -> int:
        """Score inputs the reward stage already ran through this RM's frozen backbone from its feature cache
        (`run_dir/cache` of stage 1): the head on the stored last-token features, no forward. Only a cache whose
        fingerprint this RM's card records is accepted. Returns the number of cached inputs."""
        from safetensors.torch import load_file

        meta_path = Path(cache_dir) / "features.json"
        if not meta_path.exists():
            raise ConfigError(f"reuse_features: {cache_dir} has no features.json (a frozen-backbone reward run writes it)")
        meta = json.loads(meta_path.read_text())
        if not self.card.get("feature_fingerprint") or meta.get("fingerprint") != self.card["feature_fingerprint"]:
            raise ConfigError(f"reuse_features: the features in {cache_dir} are not the ones this RM was trained on "
                              f"(fingerprints differ, or the RM's backbone was not frozen); set reuse_features=null")
        if "ids_sha1" not in meta:
            raise ConfigError(f"reuse_features: {cache_dir} predates content-addressed features; rerun the reward stage")
        self.cached_features = load_file(str(Path(cache_dir) / "features.safetensors"))["features"]
        self.cached_row = {h: i for i, h in enumerate(meta["ids_sha1"])}
        return len(self.cached_row)

    @torch.inference_mode()
    def score_ids(self, sequences: Sequence[Optional[list[int]]], stats: Optional[ScoreStats] = None) -> list[Optional[np.ndarray]]:
        """Token id lists (None = skipped) -> (K,) float arrays in input order."""
        stats = stats if stats is not None else ScoreStats()
        t0 = time.time()
        out: list[Optional[np.ndarray]] = [None] * len(sequences)
        live = []
        rows = getattr(self, "cached_row", {})
        for i, s in enumerate(sequences):
            if s is None:
                continue
            row = rows.get(ids_digest(s)) if rows else None
            if row is None:
                live.append(i)
            else:  # the same token ids through the same frozen backbone: its stored feature
                out[i] = self.model.score_pooled(self.cached_features[row:row + 1].to(self.device))[0].double().cpu().numpy()
                stats.from_cache += 1
        for batch in token_budget_batches([len(sequences[i]) for i in live], self.batch_tokens):
            idx = [live[j] for j in batch]
            ids, mask = pad_token_batch([sequences[i] for i in idx], self.pad_id)
            pred = self.model(ids.to(self.device), mask.to(self.device)).double().cpu().numpy()
            for i, p in zip(idx, pred):
                out[i] = p
            stats.tokens += int(mask.sum())
            stats.padded_tokens += mask.numel()
        stats.inputs += len(sequences)
        stats.scored += sum(o is not None for o in out)
        stats.seconds += time.time() - t0
        return out

    def score(self, conversations: Sequence[tuple], stats: Optional[ScoreStats] = None) -> list[Optional[dict]]:
        """[(system, turns ending with the assistant turn to rate), ...] -> [{attribute: raw score} | None].

        Only the attributes the RM was trained on are returned: an untrained head is noise.
        """
        stats = stats if stats is not None else ScoreStats()
        seqs = [self.tokenize(system, turns, f"input {i}", stats) for i, (system, turns) in enumerate(conversations)]
        preds = self.score_ids(seqs, stats)
        keep = [self.schema.index(a) for a in self.trained_attributes]
        return [None if p is None else {self.schema.attributes[k]: float(p[k]) for k in keep} for p in preds]
