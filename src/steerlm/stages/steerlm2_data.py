"""SteerLM 2.0 data: n samples per (prompt, target attributes) from Q', RM scores, and the three log-probs.

One group = one prompt x one target attribute set, with n responses, each carrying
log P(a|x,y) (RM + Beta likelihood), log P(y|x) (reference model, no attribute string) and
log Q'(y|a,x) (the sampling policy, with the attribute string). Groups are written in NeMo-Aligner's
`SteerLM2Dataset` JSONL fields, so its users can bring their own files::

    {"system": str, "prompt_turns": [{"from": "User", "value": str}, ...], "label": "helpfulness:4,...",
     "responses": [{"from": "Assistant", "value": str, "log(P(a|x,y))": float, "log(P(y|x))": float,
                    "log(Q(y|a,x))": float}, ...]}

(steerlm adds `id`, and per response `scores` and `tokens`; NeMo-Aligner ignores extra keys.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..attributes import AttributeSchema
from ..data.packing import collate_padded
from ..data.readers import loads_strict
from ..errors import DataError
from ..scoring import RewardScorer, ScoreStats
from ..sft_template import SFTFormat, encode_conversation
from ..losses import sequence_log_probs
from ..steerlm2_math import attribute_log_likelihood

LP_A, LP_Y, LQ = "log(P(a|x,y))", "log(P(y|x))", "log(Q(y|a,x))"
ROLE_TO_NEMO = {"user": "User", "assistant": "Assistant"}
NEMO_TO_ROLE = {v: k for k, v in ROLE_TO_NEMO.items()}


# ===== sampling and scoring ======================================================================
def sample_groups(policy, prompts: Sequence[dict], targets: Sequence[Mapping], n: int, generation: Mapping) -> list[dict]:
    """Prompt i gets target set i mod len(targets) (on top of the policy's defaults) and n sampled responses."""
    # the explicit targets go to generate (it fills the defaults): a checkpoint's level steering moves only those
    requested = [dict(targets[i % len(targets)]) if targets else None for i in range(len(prompts))]
    groups = [{"id": f"{p['id']}#{i}", "system": p["system"], "turns": p["turns"],
               "attributes": policy.resolve_attributes(requested[i])} for i, p in enumerate(prompts)]
    jobs = [(g, k) for g in groups for k in range(n)]
    outputs = policy.generate([{"system": g["system"], "turns": g["turns"]} for g, _ in jobs],
                              [requested[i] for i in range(len(groups)) for _ in range(n)], do_sample=True, **generation)
    for g in groups:
        g["responses"] = []
    for (g, _), out in zip(jobs, outputs):
        g["responses"].append({"text": out["text"], "tokens": out["tokens"]})
    return groups


def score_groups(groups: list[dict], scorer: RewardScorer, schema: AttributeSchema, likelihood_attributes: Sequence[str],
                 *, concentration: float, bins: str, stats: ScoreStats) -> dict:
    """Fill log P(a|x,y); a response the RM cannot score is dropped, a group left with < 2 responses too (counted)."""
    flat = [(g, r) for g in groups for r in g["responses"]]
    scores = scorer.score([(g["system"], g["turns"] + [{"role": "assistant", "content": r["text"]}]) for g, r in flat],
                          stats)
    for (g, r), s in zip(flat, scores):
        r["scores"] = s
        if s is not None:
            target = {a: g["attributes"][a] for a in likelihood_attributes if a in g["attributes"]}
            r["log_p_a"] = attribute_log_likelihood(s, target, schema, concentration=concentration, bins=bins)
    dropped = {"responses_unscored": 0, "groups_too_small": 0}
    kept = []
    for g in groups:
        before = len(g["responses"])
        g["responses"] = [r for r in g["responses"] if r["scores"] is not None]
        dropped["responses_unscored"] += before - len(g["responses"])
        if len(g["responses"]) < 2:
            dropped["groups_too_small"] += 1
        else:
            kept.append(g)
    groups[:] = kept
    return dropped


def encode_response(fmt: SFTFormat, tokenizer, schema: AttributeSchema, group: dict, text: str,
                    conditioned: bool) -> tuple[list[int], list[bool]]:
    """ids + mask of the response tokens only (its end-of-turn string included): the conversation so far
    without labels, then the response with the group's attribute string (conditioned) or none (reference)."""
    turns = [{**t, "labels": None} for t in group["turns"]]
    turns.append({"role": "assistant", "content": text, "labels": group["attributes"] if conditioned else None})
    ids, mask = encode_conversation(fmt, tokenizer, schema, group["system"], turns)
    last = max((k for k, m in enumerate(mask) if m), default=-1)
    first = last
    while first > 0 and mask[first - 1]:
        first -= 1
    return ids, [first <= k <= last for k in range(len(ids))]  # earlier assistant turns are context here


@torch.inference_mode()
def fill_log_probs(groups: list[dict], model, tokenizer, fmt: SFTFormat, schema: AttributeSchema, key: str, *,
                   conditioned: bool, device: torch.device, batch_tokens: int, amp_dtype=None) -> dict:
    """Teacher-forced log-prob of every response under `model` -> response[key]; returns {tokens, seconds}."""
    import time

    rows = [(r, encode_response(fmt, tokenizer, schema, g, r["text"], conditioned)) for g in groups for r in g["responses"]]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1][0]))
    t0, tokens, start = time.time(), 0, 0
    while start < len(order):
        width = len(rows[order[start]][1][0])
        take = max(1, batch_tokens // max(width, 1))
        batch = order[start:start + take]
        start += take
        b = {k: v.to(device) for k, v in collate_padded([rows[i][1] for i in batch], tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            lp = sequence_log_probs(model, b)
        for i, v in zip(batch, lp.tolist()):
            rows[i][0][key] = v
        tokens += int(b["attention_mask"].sum())
    return {"tokens": tokens, "seconds": time.time() - t0}


# ===== NeMo-Aligner SteerLM2Dataset JSONL ========================================================
def to_nemo_row(group: dict, schema: AttributeSchema) -> dict:
    return {
        "id": group["id"], "system": group["system"] or "",
        "prompt_turns": [{"from": ROLE_TO_NEMO[t["role"]], "value": t["content"]} for t in group["turns"]],
        "label": schema.format_label(group["attributes"]),
        "responses": [{"from": "Assistant", "value": r["text"], LP_A: r["log_p_a"], LP_Y: r["log_p_y"],
                       LQ: r["log_q_prime"], "scores": r.get("scores"), "tokens": r.get("tokens")}
                      for r in group["responses"]],
    }


def write_groups(path: Path, groups: Sequence[dict], schema: AttributeSchema) -> None:
    from ..checkpoint import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(to_nemo_row(g, schema), ensure_ascii=False) + "\n" for g in groups))


def read_groups(path: str | Path, schema: AttributeSchema) -> list[dict]:
    """NeMo-Aligner SteerLM2Dataset JSONL -> groups; a bad row is a one-line DataError (file:line, field)."""
    groups = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            err = lambda field, msg: DataError(str(path), line_no, field, msg)
            row = loads_strict(line, str(path), line_no)
            if not isinstance(row, dict):
                raise err(None, "expected a JSON object")
            turns = []
            for k, t in enumerate(row.get("prompt_turns") or []):
                if not isinstance(t, dict) or t.get("from") not in NEMO_TO_ROLE or not isinstance(t.get("value"), str):
                    raise err(f"prompt_turns[{k}]", "needs {from: User|Assistant, value: str}")
                turns.append({"role": NEMO_TO_ROLE[t["from"]], "content": t["value"]})
            if not turns or turns[-1]["role"] != "user":
                raise err("prompt_turns", "must be non-empty and end with a User turn")
            try:
                attributes = schema.parse_label(row.get("label") or "")
            except ValueError as e:
                raise err("label", str(e)) from None
            responses = []
            for k, r in enumerate(row.get("responses") or []):
                if not isinstance(r, dict) or not isinstance(r.get("value"), str):
                    raise err(f"responses[{k}]", "needs a string 'value'")
                lps = {}
                for key, name in ((LP_A, "log_p_a"), (LP_Y, "log_p_y"), (LQ, "log_q_prime")):
                    v = r.get(key)
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                        raise err(f"responses[{k}].{key}", f"must be a finite number, got {v!r}")
                    lps[name] = float(v)
                responses.append({"text": r["value"], **lps, "scores": r.get("scores"), "tokens": r.get("tokens")})
            if len(responses) < 2:
                raise err("responses", f"needs at least 2 responses, got {len(responses)}")
            system = row.get("system") or None
            groups.append({"id": row.get("id", f"{Path(path).name}:{line_no}"), "system": system, "turns": turns,
                           "attributes": attributes, "responses": responses})
    return groups


def group_summary(groups: Sequence[dict]) -> Optional[dict]:
    if not groups:
        return None
    n = [len(g["responses"]) for g in groups]
    return {"groups": len(groups), "responses": sum(n), "min_n": min(n), "max_n": max(n)}
