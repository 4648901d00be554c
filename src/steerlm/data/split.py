"""Held-out splits that never separate a group, plus the stable group keys loaders assign.

A group is every item that shares a prompt (HelpSteer2 rates two responses per prompt) or a
conversation tree (OASST): putting one half in train and the other in validation would leak the
prompt, so whole groups go to one side.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def stable_hash(text: str, n_hex: int = 16) -> str:
    """Hex digest that is the same on every machine and Python run (unlike `hash`)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n_hex]


def prompt_group(prefix: str, prompt: str) -> str:
    """Group key for items that share a prompt: ``<prefix>/prompt/<hash of the prompt text>``."""
    return f"{prefix}/prompt/{stable_hash(prompt)}"


def _unit_interval(group: str, seed: int) -> float:
    """Map (group, seed) to a deterministic number in [0, 1)."""
    return int(stable_hash(f"{seed}\x00{group}", 15), 16) / 16**15


def split_by_group(items: Sequence[dict], val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split items (dicts with a "group" key) into (train, val), keeping each group whole.

    A group goes to val when hash(group, seed) < val_fraction, so its side does not depend on what
    else is in the data (adding rows never moves existing groups). Train is never empty; with
    val_fraction > 0 and at least two groups, val is not either (the nearest group is moved).
    Item order is preserved within each side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    score: dict[str, float] = {}
    for i, item in enumerate(items):
        group = item.get("group")
        if not isinstance(group, str) or not group:
            raise ValueError(f"item {i} (id {item.get('id')!r}) has no 'group' to split on")
        if group not in score:
            score[group] = _unit_interval(group, seed)
    val_groups = {g for g, s in score.items() if s < val_fraction} if val_fraction > 0 else set()
    if val_groups and len(val_groups) == len(score):  # train is never empty (a lone group stays there)
        val_groups.discard(max(score, key=score.get))
    if val_fraction > 0 and len(score) >= 2 and not val_groups:
        val_groups.add(min(score, key=score.get))
    train = [it for it in items if it["group"] not in val_groups]
    val = [it for it in items if it["group"] in val_groups]
    return train, val
