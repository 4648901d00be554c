"""Same-prompt length ordering: a second training signal for one reward-model head (e.g. verbosity).

Why (docs/steerability.md): the bundled data rates verbosity on 84 HelpSteer2 training rows only; a head
fitted to them alone tracks answer length with Spearman 0.37 held out, so a policy whose answers do get
longer on request barely moves the RM's verbosity. Two answers to one prompt, one with >= ratio x the
words of the other, carry the ordering for free: on the bundled HelpSteer2 rows annotators rated the
longer answer of such a pair more verbose 17 times, less verbose once (5 ties). OASST trees give ~400
such pairs without any verbosity label.

    L = L_mse + λ · mean_{(a, b) ∈ P} max(0, m − (s_k(a) − s_k(b)))      (k: the head, a: the longer answer)

Pairs are drawn only within the training split; validation pairs measure the head (accuracy, and
Spearman(head, words) over all held-out answers).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from .errors import ConfigError
from .losses import order_hinge


def length_order_pairs(samples: Sequence[dict], ratio: float) -> list[tuple[int, int]]:
    """(longer, shorter) index pairs among samples that answer the same prefix, words(a) >= ratio x words(b).

    samples: {context, words}. Labels play no part: any two answers to one prompt can form a pair.
    """
    by_context = defaultdict(list)
    for i, s in enumerate(samples):
        by_context[s["context"]].append(i)
    return [(a, b) for idx in by_context.values() for a in idx for b in idx
            if samples[a]["words"] >= ratio * max(samples[b]["words"], 1)]


class LengthOrder:
    """The loss term and its held-out measures for `loss.length_order` (off when attribute is null)."""

    def __init__(self, cfg, schema, train: Sequence[dict], val: Sequence[dict], seed: int):
        self.attribute = cfg.get("attribute") if cfg else None
        if not self.attribute:
            return
        if self.attribute not in schema:
            raise ConfigError(f"loss.length_order.attribute={self.attribute!r} is not in schema {schema.name!r}")
        if float(cfg.ratio) <= 1.0 or float(cfg.margin) <= 0 or float(cfg.weight) < 0 or int(cfg.pairs_per_step) < 1:
            raise ConfigError("loss.length_order needs ratio > 1, margin > 0, weight >= 0, pairs_per_step >= 1 "
                              f"(got ratio={cfg.ratio}, margin={cfg.margin}, weight={cfg.weight}, "
                              f"pairs_per_step={cfg.pairs_per_step})")
        self.k = schema.attributes.index(self.attribute)
        self.margin, self.weight, self.per_step = float(cfg.margin), float(cfg.weight), int(cfg.pairs_per_step)
        self.train, self.val = train, val
        self.pairs = length_order_pairs(train, float(cfg.ratio))
        self.val_pairs = length_order_pairs(val, float(cfg.ratio))
        self.seed = seed
        if not self.pairs:
            raise ConfigError(f"loss.length_order: no two training answers to one prompt differ {cfg.ratio}x in "
                              "length; the data has no pairs for it (set loss.length_order.attribute=null)")

    def __bool__(self) -> bool:
        return bool(self.attribute)

    def step_pairs(self, step: int) -> list[tuple[int, int]]:
        """The step's pairs: a seeded draw, so a resumed run draws the same ones."""
        rng = random.Random(f"length_order/{self.seed}/{step}")
        return rng.sample(self.pairs, min(self.per_step, len(self.pairs)))

    def loss(self, forward, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """λ · Σ hinge over `pairs` (the caller divides by the step's pair count): scalar with grad."""
        high, _ = forward([self.train[a] for a, _ in pairs], "input_ids")
        low, _ = forward([self.train[b] for _, b in pairs], "input_ids")
        return self.weight * order_hinge(high[:, self.k], low[:, self.k], self.margin).sum()

    def metrics(self, val_pred: np.ndarray) -> dict:
        """Held out: ordering accuracy on same-prompt pairs, and Spearman(head, words) over every answer."""
        s = val_pred[:, self.k]
        acc = float(np.mean([s[a] > s[b] for a, b in self.val_pairs])) if self.val_pairs else None
        words = [x["words"] for x in self.val]
        rho = float(spearmanr(s, words)[0]) if len(set(words)) > 1 else None
        return {"attribute": self.attribute, "train_pairs": len(self.pairs), "val_pairs": len(self.val_pairs),
                "val_pair_accuracy": acc, "val_spearman_words": rho}
