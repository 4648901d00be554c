"""Forward passes of the reward stage: training micro-batches, sharded batched prediction, and the
feature cache used when the backbone is frozen.

Sharded prediction: inputs are sorted by length and dealt round-robin to ranks, each rank runs
length-homogeneous batches (little padding), and the results are gathered back into input order.
Every rank runs the same number of batches, as FSDP2's collectives require.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.batching import pad_token_batch
from ..engines import torch_engine as te
from ..logging import print0
from ..models.embedded import resolve_model_path
from ..checkpoint import write_text_atomic
from ..scoring import ids_digest


class RewardForward:
    """Calls the (possibly wrapped) model on lists of tokenized items, or the head on cached features."""

    def __init__(self, rm, model, info: te.DistInfo, amp_dtype, pad_id: int):
        self.rm, self.model, self.info, self.amp_dtype, self.pad_id = rm, model, info, amp_dtype, pad_id
        self.cache: Optional[FeatureCache] = None

    def __call__(self, items: list[dict], key: str) -> tuple[torch.Tensor, int]:
        """-> ((B, K) predictions with grad, non-pad tokens run through the backbone)."""
        if self.cache is not None:
            return self.rm.score_pooled(self.cache.lookup(items, key).to(self.info.device)), 0
        ids, mask = pad_token_batch([x[key] for x in items], self.pad_id)
        return self.model(ids.to(self.info.device), mask.to(self.info.device)), int(mask.sum())

    @torch.no_grad()
    def predict(self, items: list[dict], key: str, batch_size: int) -> np.ndarray:
        """(N, K) float64 predictions in input order."""
        if self.cache is not None:
            return self.rm.score_pooled(self.cache.lookup(items, key).to(self.info.device)).double().cpu().numpy()
        self.model.eval()
        return self.sharded_map(items, key, batch_size, lambda ids, mask: self.model(ids, mask), desc=None)[0].numpy()

    @torch.no_grad()
    def sharded_map(self, items: list[dict], key: str, batch_size: int,
                    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], desc: Optional[str]):
        """Apply fn to length-sorted batches spread over ranks -> ((N, D) float64 in input order, tokens)."""
        info = self.info
        order = sorted(range(len(items)), key=lambda i: -len(items[i][key]))
        mine = order[info.rank::info.world_size]
        n_batches = math.ceil(math.ceil(len(items) / info.world_size) / batch_size)
        results, tokens = [], 0
        for b in tqdm(range(n_batches), desc=desc, disable=desc is None or not info.is_main, dynamic_ncols=True):
            idx = mine[b * batch_size:(b + 1) * batch_size]
            real = len(idx)
            if not idx:  # keep collectives aligned: run a throwaway sample
                idx = [order[0]]
            ids, mask = pad_token_batch([items[i][key] for i in idx], self.pad_id)
            with te.autocast(info.device, self.amp_dtype):
                out = fn(ids.to(info.device), mask.to(info.device)).double().cpu()
            results += list(zip(idx[:real], out[:real]))
            tokens += int(mask[:real].sum())
        gathered = te.all_gather_objects(results)
        tokens = int(te.all_reduce_sum([tokens], info.device)[0])
        rows = dict(pair for part in gathered for pair in part)
        return torch.stack([rows[i] for i in range(len(items))]), tokens


class FeatureCache:
    """Last-token hidden states of every input, computed once (frozen backbone), keyed by item id.

    Stored as `run_dir/cache/features.safetensors` with a fingerprint of the model, template,
    precision and every token id; a rerun with the same inputs loads it instead of recomputing.
    """

    def __init__(self, features: torch.Tensor, keys: list[str], tokens_per_s: Optional[float], fingerprint: str):
        self.features = features  # (N, H) fp32
        self.row = {k: i for i, k in enumerate(keys)}
        self.tokens_per_s, self.fingerprint = tokens_per_s, fingerprint

    def lookup(self, items: list[dict], key: str) -> torch.Tensor:
        return self.features[[self.row[f"{x['id']}|{key}"] for x in items]]

    @classmethod
    def build(cls, forward: RewardForward, data: dict, cache_dir: Path, cfg, logger) -> "FeatureCache":
        entries = [(x, "input_ids") for x in data["train"] + data["val"]]
        entries += [(p, k) for p in data["train_pairs"] + data["val_pairs"] for k in ("chosen_ids", "rejected_ids")]
        keys = [f"{x['id']}|{k}" for x, k in entries]
        flat = [{"id": key, "ids": x[k]} for key, (x, k) in zip(keys, entries)]
        fingerprint = _fingerprint(cfg, flat)
        path, meta_path = cache_dir / "features.safetensors", cache_dir / "features.json"
        if path.exists() and meta_path.exists() and json.loads(meta_path.read_text())["fingerprint"] == fingerprint:
            meta = json.loads(meta_path.read_text())
            print0(f"feature cache: reusing {path} ({len(keys)} inputs)")
            if "ids_sha1" not in meta and forward.info.is_main:  # written before caches were content-addressed
                meta["ids_sha1"] = [ids_digest(x["ids"]) for x in flat]
                write_text_atomic(meta_path, json.dumps(meta))
            return cls(load_file(str(path))["features"], meta["keys"], meta["tokens_per_s"], fingerprint)
        rm = forward.rm
        rm.eval()
        t0 = time.time()
        feats, tokens = forward.sharded_map(flat, "ids", cfg.eval.batch_size, rm.pooled_hidden,
                                            desc="features (frozen backbone)")
        dt = time.time() - t0
        tps = round(tokens / max(dt, 1e-9), 1)
        feats = feats.float()
        logger.log({"features/tokens": tokens, "features/tokens_per_s": tps, "features/seconds": round(dt, 1),
                    "features/peak_mem_mb": te.peak_memory_mb(forward.info.device)}, 0)
        if forward.info.is_main:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"features": feats.contiguous()}, str(tmp))
            tmp.replace(path)
            meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
            # ids_sha1: content addresses, so a scorer of the same RM can reuse a feature (steerlm.scoring)
            meta_tmp.write_text(json.dumps({"fingerprint": fingerprint, "keys": keys, "tokens_per_s": tps,
                                            "ids_sha1": [ids_digest(x["ids"]) for x in flat]}))
            meta_tmp.replace(meta_path)
        te.barrier()
        return cls(feats, keys, tps, fingerprint)


def _fingerprint(cfg, flat: list[dict]) -> str:
    """Same model weights, precision and token ids -> same features."""
    h = hashlib.sha256()
    h.update(json.dumps([str(cfg.model.path), cfg.model.dtype, cfg.engine.precision, cfg.template]).encode())
    model_dir = Path(resolve_model_path(str(cfg.model.path)))
    for f in sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for x in flat:
        h.update(x["id"].encode())
        h.update(np.asarray(x["ids"], dtype=np.int64).tobytes())
    return h.hexdigest()
