"""Build attribute steering vectors for a stage-3 model from stage-2 labels (math: `steerlm.steering.vectors`)."""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig, OmegaConf

from ..engines import torch_engine as te
from ..logging import print0
from ..steering.vectors import build_attribute_vectors
from ..steerable import SteerableModel


def run(cfg: DictConfig) -> dict:
    t0 = time.time()
    policy = SteerableModel.load(str(cfg.policy), cfg.device, cfg.precision)
    attributes = OmegaConf.to_container(cfg.attributes, resolve=True)
    attributes = [attributes] if isinstance(attributes, str) else attributes
    layers = OmegaConf.to_container(cfg.layers, resolve=True) if cfg.layers is not None else None
    vecs = build_attribute_vectors(policy.model, policy.tokenizer, policy.format, policy.schema, str(cfg.labeled),
                                   attributes, layers, fraction=float(cfg.fraction), max_per_side=int(cfg.max_per_side),
                                   min_per_side=int(cfg.min_per_side), batch_size=int(cfg.batch_size),
                                   max_length=int(cfg.max_length), device=policy.device)
    vecs.meta.update(model=str(cfg.policy), wall_time_s=round(time.time() - t0, 1),
                     peak_mem_mb=round(te.peak_memory_mb(policy.device), 1))
    vecs.save(cfg.output_dir)
    for a, m in vecs.meta["attributes"].items():
        norms = ", ".join(f"{i}:{v:.2f}" for i, v in m["norms"].items())
        print0(f"{a}: high {m['high']} turns (scores {m['high_score_range'][0]:.2f}..{m['high_score_range'][1]:.2f}), "
               f"low {m['low']} ({m['low_score_range'][0]:.2f}..{m['low_score_range'][1]:.2f}), "
               f"{m['skipped_over_max_length']} over max_length skipped; |v| per layer {norms}")
    print0(f"steering vectors -> {cfg.output_dir} in {vecs.meta['wall_time_s']} s")
    return json.loads(json.dumps(vecs.meta))
