"""OpenAssistant OASST1 -> canonical conversations (one per rated assistant message) and pairs.

Two input shapes hold the same messages:

- the HF message table (`OpenAssistant/oasst1`, and data/oasst1 here): one message per row,
  linked by `parent_id`; `labels` = {"name": [...], "value": [...], "count": [...]};
- the trees dump (`2023-04-12_oasst_all.trees.jsonl.gz`, what NeMo-Aligner reads): one tree per
  row, {"message_tree_id", "prompt": {message fields..., "replies": [nested messages]}}, with
  `labels` = {name: {"value", "count"}}.

A rated assistant message becomes the conversation root -> ... -> that message (earlier assistant
turns unrated). Labels keep only the attributes SteerLM uses (quality, toxicity, humor, creativity),
mapped 0..1 -> 0..4 with `round(v * 4)` exactly as NeMo-Aligner's `encode_labels`; OASST's other
label names (spam, helpfulness, violence, ...) are dropped by design. Unlike NeMo-Aligner, which
expands every root-to-leaf path (duplicating shared prefixes), each rated message is one sample.

Deleted messages, and messages below a deleted or missing one, are skipped and counted by reason.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional, Sequence

from ..attributes import OASST_ATTRIBUTES, AttributeSchema
from ..errors import DataError
from .schema import Conversation, PreferencePair, make_turn, validate_conversation

HUB_ID = "OpenAssistant/oasst1"
ROLE_MAP = {"prompter": "user", "assistant": "assistant"}
LIKERT_MAX = 4  # NeMo-Aligner: round(value * (likert_scale - 1)) with likert_scale = 5


def message_labels(labels) -> dict[str, float]:
    """OASST labels in either shape -> {name: mean value in 0..1} (entries without a value dropped)."""
    if not labels:
        return {}
    if isinstance(labels.get("name"), list):  # HF message table: parallel lists
        pairs = zip(labels["name"], labels.get("value") or [])
    else:  # trees dump: {name: {"value": v, "count": c}}
        pairs = ((n, d.get("value") if isinstance(d, dict) else d) for n, d in labels.items())
    return {n: v for n, v in pairs if v is not None}


def encode_labels(labels, attributes: Sequence[str] = OASST_ATTRIBUTES) -> dict[str, float]:
    """NeMo-Aligner's encode_labels: keep `attributes`, map v in [0, 1] to round(v * 4)."""
    values = message_labels(labels)
    return {a: float(round(values[a] * LIKERT_MAX)) for a in attributes if a in values}


def flatten_tree(tree: dict) -> list[dict]:
    """One trees-dump row -> its messages, parents before children, `parent_id` set from nesting."""
    root = tree.get("prompt")
    if not isinstance(root, dict):
        raise ValueError("tree row has no 'prompt' message object")
    out, stack = [], [(root, None)]
    while stack:
        msg, parent_id = stack.pop()
        flat = {k: v for k, v in msg.items() if k != "replies"}
        flat["parent_id"] = parent_id
        flat.setdefault("message_tree_id", tree.get("message_tree_id") or root.get("message_id"))
        out.append(flat)
        replies = msg.get("replies") or []
        if not all(isinstance(r, dict) for r in replies):
            raise ValueError(f"message {msg.get('message_id')}: 'replies' must be a list of message objects")
        stack.extend((r, msg.get("message_id")) for r in reversed(replies))
    return out


class MessageForest:
    """All messages of a file by id, and why (if) the chain from a message up to its root is broken."""

    def __init__(self, rows: Iterable[tuple[int, dict]], *, where: str, lang: Optional[str] = None):
        self.where, self.lang = where, lang
        self.messages: dict[str, dict] = {}  # message_id -> message (+ "_line")
        self.rows_read = self.trees = 0
        for line, row in rows:
            self.rows_read += 1
            if "message_id" not in row and "prompt" in row:
                self.trees += 1
                try:
                    msgs = flatten_tree(row)
                except ValueError as e:
                    raise DataError(where, line, "prompt", str(e)) from None
            else:
                msgs = [row]
            for msg in msgs:
                self._add(msg, line)
        self._broken: dict[str, Optional[str]] = {}

    def _add(self, msg: dict, line: int) -> None:
        mid = msg.get("message_id")
        if not isinstance(mid, str) or not mid:
            raise DataError(self.where, line, "message_id", "missing message_id")
        if mid in self.messages:
            raise DataError(self.where, line, "message_id", f"duplicate message_id {mid} (first on line "
                                                           f"{self.messages[mid]['_line']})")
        if msg.get("role") not in ROLE_MAP:
            raise DataError(self.where, line, "role", f"message {mid}: role {msg.get('role')!r} is not prompter/assistant")
        self.messages[mid] = {**msg, "_line": line}

    def _own_problem(self, msg: dict) -> Optional[str]:
        if msg.get("deleted"):
            return "deleted"
        if self.lang is not None and msg.get("lang") != self.lang:
            return "other_lang"
        parent = msg.get("parent_id")
        if parent is not None and parent not in self.messages:
            return "missing_parent"
        return None

    def broken(self, mid: str) -> Optional[str]:
        """None if the message and its whole ancestor chain are usable, else the skip reason."""
        chain, cur = [], mid
        while cur is not None and cur not in self._broken:  # walk up to a known answer
            if len(chain) > len(self.messages):
                raise DataError(self.where, self.messages[mid]["_line"], "parent_id", f"message {mid}: parent cycle")
            chain.append(cur)
            msg = self.messages[cur]
            if self._own_problem(msg):
                break
            cur = msg.get("parent_id")
        answer = self._broken.get(cur) if cur is not None else None
        for m in reversed(chain):  # memoize top-down so every message is resolved once
            own = self._own_problem(self.messages[m])
            if own:
                answer = own
            elif answer is not None:
                answer = answer if answer.startswith("ancestor_") else f"ancestor_{answer}"
            self._broken[m] = answer
        return self._broken[mid]

    def path(self, mid: str) -> list[dict]:
        """Messages from the root down to `mid` (the chain must not be broken)."""
        out, cur = [], mid
        while cur is not None:
            out.append(self.messages[cur])
            cur = self.messages[cur].get("parent_id")
        return out[::-1]

    def turns(self, path: list[dict]) -> list:
        turns = []
        for msg in path:
            text = msg.get("text")
            if not isinstance(text, str) or not text.strip():
                raise DataError(self.where, msg["_line"], "text", f"message {msg['message_id']}: missing or empty text")
            turns.append(make_turn(ROLE_MAP[msg["role"]], text))
        return turns

    @staticmethod
    def group(msg: dict) -> str:
        return f"oasst1/tree/{msg.get('message_tree_id') or msg['message_id']}"


def _base_stats(forest: MessageForest, fmt: str) -> dict:
    roles = [m["role"] for m in forest.messages.values()]
    stats = {"source": forest.where, "format": fmt, "rows_read": forest.rows_read,
             "messages": len(roles), "assistant_messages": roles.count("assistant"),
             "prompter_messages": roles.count("prompter")}
    if forest.trees:
        stats["trees"] = forest.trees
    return stats


def oasst_conversations(
    rows: Iterable[tuple[int, dict]],
    schema: AttributeSchema,
    *,
    where: str,
    lang: Optional[str] = None,
    id_prefix: str = "oasst1",
    attributes: Sequence[str] = OASST_ATTRIBUTES,
) -> tuple[list[Conversation], dict]:
    """One conversation per usable rated assistant message, in input order.

    Every assistant message is either kept or counted in stats["skipped"] under one reason:
    deleted, other_lang (with `lang`), missing_parent, ancestor_<reason>, root_not_prompter,
    unrated (none of `attributes` annotated). Every entry of `attributes` must be in `schema`.
    """
    for a in attributes:
        if a not in schema:
            raise DataError(where, None, "labels", f"attribute {a!r} not in schema {schema.name!r} "
                                                   f"({','.join(schema.attributes)}); restrict `attributes`")
    forest = MessageForest(rows, where=where, lang=lang)
    convs: list[Conversation] = []
    skipped: dict[str, int] = defaultdict(int)
    for mid, msg in forest.messages.items():
        if msg["role"] != "assistant":
            continue
        reason = forest.broken(mid)
        if reason is None and msg.get("parent_id") is None:
            reason = "root_not_prompter"
        try:
            labels = encode_labels(msg.get("labels"), attributes) if reason is None else None
        except (TypeError, AttributeError, ValueError) as e:
            raise DataError(where, msg["_line"], "labels", f"message {mid}: unreadable labels ({e})") from None
        if reason is None and not labels:
            reason = "unrated"
        if reason:
            skipped[reason] += 1
            continue
        turns = forest.turns(forest.path(mid))
        turns[-1]["labels"] = labels
        conv = {"id": f"{id_prefix}/{mid}", "group": forest.group(msg), "system": None,
                "turns": turns, "source": "oasst1"}
        convs.append(validate_conversation(conv, schema, where=where, line=msg["_line"]))
    stats = {**_base_stats(forest, "oasst"), "kept": len(convs), "skipped": dict(sorted(skipped.items()))}
    return convs, stats


def oasst_preference_pairs(
    rows: Iterable[tuple[int, dict]],
    *,
    where: str,
    lang: Optional[str] = None,
    id_prefix: str = "oasst1",
) -> tuple[list[PreferencePair], dict]:
    """Sibling assistant replies ranked differently under one prompter message -> pairs.

    The lower `rank` (0 = best) is chosen; strength = the rank difference. Context = the path to
    the parent, unrated. Every assistant message is either one of stats["paired_replies"] or counted
    once in stats["skipped"]: a broken chain (by reason), parent_not_prompter, unranked (`rank`
    null), no_ranked_sibling. Sibling pairs with equal rank or identical texts give no pair and are
    counted in stats["tied_pairs"] / stats["identical_pairs"].
    """
    forest = MessageForest(rows, where=where, lang=lang)
    replies_by_parent: dict[Optional[str], list[dict]] = defaultdict(list)
    for msg in forest.messages.values():
        if msg["role"] == "assistant":
            replies_by_parent[msg.get("parent_id")].append(msg)
    pairs: list[PreferencePair] = []
    skipped: dict[str, int] = defaultdict(int)
    paired_replies = tied_pairs = identical_pairs = 0
    for pid, replies in replies_by_parent.items():
        ranked = []
        for r in replies:
            reason = forest.broken(r["message_id"])
            if reason is None and (pid is None or forest.messages[pid]["role"] != "prompter"):
                reason = "parent_not_prompter"
            if reason is None and (isinstance(r.get("rank"), bool) or not isinstance(r.get("rank"), int)):
                reason = "unranked"
            if reason:
                skipped[reason] += 1
            else:
                ranked.append(r)
        if len(ranked) < 2:
            skipped["no_ranked_sibling"] += len(ranked)
            continue
        paired_replies += len(ranked)
        ranked.sort(key=lambda r: r["rank"])
        parent = forest.messages[pid]
        context = forest.turns(forest.path(pid))
        for i, better in enumerate(ranked):
            for worse in ranked[i + 1:]:
                if better["rank"] == worse["rank"]:
                    tied_pairs += 1
                    continue
                chosen, rejected = forest.turns([better])[0]["content"], forest.turns([worse])[0]["content"]
                if chosen == rejected:  # duplicate submissions exist; a pair of equal texts teaches nothing
                    identical_pairs += 1
                    continue
                pairs.append({
                    "id": f"{id_prefix}/pair/{better['message_id']}/{worse['message_id']}",
                    "group": forest.group(parent), "system": None, "context": [dict(t) for t in context],
                    "chosen": chosen, "rejected": rejected,
                    "strength": float(worse["rank"] - better["rank"]), "source": "oasst1",
                })
    stats = {**_base_stats(forest, "oasst_preference"), "kept": len(pairs), "paired_replies": paired_replies,
             "tied_pairs": tied_pairs, "identical_pairs": identical_pairs, "skipped": dict(sorted(skipped.items()))}
    return pairs, stats
