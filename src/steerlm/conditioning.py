"""Conditioning strength: does the policy's likelihood of a response follow the attribute value in its prompt?

A cheap, deterministic, generation-free check of what AC-SFT is meant to teach. For a held-out labeled
response y to prompt x, with its own label ℓ_a(y) for attribute a, the policy scores y teacher-forced under
every requested level v of a, everything else fixed (the other attributes at the response's own labels):

    L_y(v) = log π(y | x, a = v, a_{-} = ℓ_{-}(y))          (nats, summed over y's tokens and its stop string)

A model that ignores the attribute string has L_y(v) constant in v. A model that follows it finds y most
likely under the level y was written for. Read as a classifier, the model's posterior over levels (uniform
prior) decodes a level for every response:

    p(v | x, y) = softmax_v L_y(v),        v̂(y) = Σ_v v · p(v | x, y)        (the decoded level)

and, over responses, the conditioning strength is how the decoded level follows the response's own label:

    strength = Spearman(v̂(y), ℓ_a(y))    with a 95% bootstrap interval (resampling conversation groups)
    gain     = OLS slope of v̂ on ℓ_a      (1: levels decoded exactly; 0: nothing)

Both are 0 for a model whose likelihood does not depend on the attribute string (every v̂ equal), positive
when the preference follows the label, negative when it is reversed. A preference for one level whatever the
response (a prior, not conditioning) shifts every v̂ alike and leaves the ranking alone. `length_strength`
= Spearman(v̂, tokens of y): the RM-free view for verbosity. `mean_abs_slope`: how many nats per level the
attribute moves the likelihood at all (OLS slope of L_y over v, averaged in absolute value). Measured for the
policy and, as the control, its base model given the same attribute strings.
"""

from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .attributes import AttributeSchema
from .data.packing import collate_padded
from .losses import sequence_log_probs
from .sft_template import SFTFormat, encode_conversation


def last_response_rows(fmt: SFTFormat, tokenizer, schema: AttributeSchema, conv: Mapping, attribute: str,
                       levels: Sequence[int]) -> list[tuple[list[int], list[bool]]]:
    """The conversation rendered once per level of `attribute` in its last turn's labels; the mask keeps only
    the last response (and its stop string): earlier turns are context."""
    turns = [dict(t) for t in conv["turns"]]
    own = dict(turns[-1]["labels"])
    rows = []
    for v in levels:
        turns[-1] = {**turns[-1], "labels": {**own, attribute: float(v)}}
        ids, mask = encode_conversation(fmt, tokenizer, schema, conv["system"], turns)
        last = max(k for k, m in enumerate(mask) if m)
        first = last
        while first > 0 and mask[first - 1]:
            first -= 1
        rows.append((ids, [first <= k <= last for k in range(len(ids))]))
    return rows


@torch.inference_mode()
def batched_sequence_log_probs(model, rows: Sequence[tuple[list[int], list[bool]]], pad_id: int,
                               device: torch.device, batch_tokens: int = 4096, amp_dtype=None) -> list[float]:
    """Teacher-forced Σ log p over each row's trained tokens, in length-sorted padded batches of <= batch_tokens."""
    out: list[float] = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    start = 0
    while start < len(order):
        width = len(rows[order[start]][0])
        batch = order[start:start + max(1, batch_tokens // max(width, 1))]
        start += len(batch)
        b = {k: v.to(device) for k, v in collate_padded([rows[i] for i in batch], pad_id).items()}
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            lp = sequence_log_probs(model, b)
        for i, v in zip(batch, lp.float().tolist()):
            out[i] = v
    return out


def labeled_responses(conversations: Sequence[Mapping], attribute: str) -> list[Mapping]:
    """Conversations whose last turn is an assistant response labeled for `attribute`, truncated after it, taken
    round-robin over conversation groups (one per OASST tree / prompt, then a second, ...): the first n then
    span as many groups as possible, and the cluster bootstrap has clusters to resample."""
    by_group: dict[str, list[Mapping]] = {}
    for c in conversations:
        turns = list(c["turns"])
        while turns and turns[-1]["role"] != "assistant":
            turns.pop()
        if turns and attribute in (turns[-1].get("labels") or {}):
            by_group.setdefault(c.get("group") or c["id"], []).append({**c, "turns": turns})
    queues = list(by_group.values())
    return [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]


def decoded_levels(log_liks: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """(responses, levels) log-likelihoods -> each response's posterior mean level under a uniform prior."""
    z = log_liks - log_liks.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)) @ np.asarray(levels, dtype=np.float64)


def preference_slopes(log_liks: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """(responses, levels) log-likelihoods -> per-response OLS slope over the levels (nats per level)."""
    v = np.asarray(levels, dtype=np.float64)
    v = v - v.mean()
    return (log_liks - log_liks.mean(axis=1, keepdims=True)) @ v / float(v @ v)


def measure(model, tokenizer, fmt: SFTFormat, schema: AttributeSchema, conversations: Sequence[Mapping],
            attributes: Sequence[str], levels: Sequence[int] = (0, 1, 2, 3, 4), *, device: torch.device,
            n_max: Optional[int] = None, batch_tokens: int = 4096, amp_dtype=None, max_length: Optional[int] = None,
            n_boot: int = 2000, seed: int = 0, steering_of=None) -> dict:
    """Conditioning strength per attribute -> {attribute: {strength, gain, length_strength, ...}, "tokens", "seconds"}.

    conversations: held-out labeled conversations (canonical schema). The first `n_max` whose last response
    carries a label for the attribute (and fits `max_length`) are used. steering_of(attribute, level): the
    activation steering that goes with a requested level (a checkpoint's level steering), or None.
    """
    from .steerability import CI, bootstrap_ci, verdict

    t0, tokens = time.time(), 0
    was_training = model.training
    model.eval()
    result: dict = {}
    for a in attributes:
        convs, rows_all, skipped = [], [], 0
        for c in labeled_responses(conversations, a):
            rows = last_response_rows(fmt, tokenizer, schema, c, a, levels)
            if max_length is not None and max(len(r[0]) for r in rows) > max_length:
                skipped += 1
                continue
            convs.append(c)
            rows_all += rows
            if n_max is not None and len(convs) == n_max:
                break
        if len(convs) < 3:
            result[a] = {"n": len(convs), "skipped_over_length": skipped, "strength": None}
            continue
        if steering_of is None:
            ll = np.array(batched_sequence_log_probs(model, rows_all, tokenizer.pad_token_id, device, batch_tokens,
                                                     amp_dtype), dtype=np.float64).reshape(len(convs), len(levels))
        else:  # one pass per level, under that level's steering
            from .steering import steer

            ll = np.zeros((len(convs), len(levels)))
            for k, v in enumerate(levels):
                with steer(model, steering_of(a, v)):
                    ll[:, k] = batched_sequence_log_probs(model, rows_all[k::len(levels)], tokenizer.pad_token_id,
                                                          device, batch_tokens, amp_dtype)
        tokens += sum(len(r[0]) for r in rows_all)
        slopes = preference_slopes(ll, levels)
        decoded = decoded_levels(ll, levels)
        own = np.array([c["turns"][-1]["labels"][a] for c in convs], dtype=np.float64)
        length = np.array([sum(r[1]) for r in rows_all[::len(levels)]], dtype=np.float64)
        groups = [c.get("group") or c["id"] for c in convs]
        if np.ptp(decoded) == 0:  # every response decodes to the same level: no conditioning at all (not undefined)
            rho = gain = length_rho = CI(0.0, 0.0, 0.0, len(convs), len(set(groups)), n_boot)
        else:
            rho = bootstrap_ci(own, decoded, "spearman", clusters=groups, n_boot=n_boot, seed=seed)
            gain = bootstrap_ci(own, decoded, "slope", clusters=groups, n_boot=n_boot, seed=seed)
            length_rho = bootstrap_ci(length, decoded, "spearman", clusters=groups, n_boot=n_boot, seed=seed)
        result[a] = {
            "n": len(convs), "skipped_over_length": skipped, "levels": list(levels),
            "strength": rho.to_dict(), "verdict": verdict(rho),
            "gain": gain.to_dict(),
            "length_strength": length_rho.to_dict(),
            "mean_abs_slope": float(np.abs(slopes).mean()),
            "label_counts": {int(v): int((own == v).sum()) for v in np.unique(own)},
        }
    model.train(was_training)
    result_meta = {"tokens": tokens, "seconds": round(time.time() - t0, 2)}
    return {"attributes": result, **result_meta}
