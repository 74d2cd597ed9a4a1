"""A training batch from built examples: the batch-level filters.

In this order, each counted by reason: near-duplicate prompts (SimHash); at most
``max_pairs_per_conversation`` examples per conversation and ``max_pairs_per_user`` per user;
then no user above ``max_user_share`` of the batch (once the batch has enough users for the
share to be possible), which is what stops one user flooding DSAT from steering a run; and for
KTO, desirable and undesirable examples balanced by keeping the same number of each.

Examples are ranked first (label confidence, then id), so which ones a cap keeps is
deterministic: the same input gives the same batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from learner.dedupe import NearDuplicates
from learner.records import PreferencePairRecord, UnpairedRecord
from services.settings import LearnerSettings

Example = TypeVar("Example", PreferencePairRecord, UnpairedRecord)


@dataclass
class Batch:
    pairs: list[PreferencePairRecord] = field(default_factory=list)
    unpaired: list[UnpairedRecord] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)


def _user(example: PreferencePairRecord | UnpairedRecord) -> str:
    return example.source.user_id or f"conversation:{example.source.conversation_id}"


def _prompt_text(example: PreferencePairRecord | UnpairedRecord) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in example.prompt)


def select(
    examples: Sequence[Example], settings: LearnerSettings, drops: Counter[str], kind: str
) -> list[Example]:
    ranked = sorted(examples, key=lambda e: (-e.source.confidence, e.id))
    seen_ids: set[str] = set()
    near = NearDuplicates(settings.near_duplicate_distance)
    per_conversation: Counter[str] = Counter()
    per_user: Counter[str] = Counter()
    kept: list[Example] = []
    for example in ranked:
        if example.id in seen_ids:
            drops[f"{kind}_duplicate"] += 1
            continue
        seen_ids.add(example.id)
        # KTO keeps one desirable and one undesirable completion of the same prompt apart.
        key = _prompt_text(example)
        if isinstance(example, UnpairedRecord):
            key = f"{example.label}\n{key}"
        if near.seen(key):
            drops[f"{kind}_near_duplicate_prompt"] += 1
            continue
        conversation = example.source.conversation_id
        if per_conversation[conversation] >= settings.max_pairs_per_conversation:
            drops[f"{kind}_conversation_cap"] += 1
            continue
        user = _user(example)
        if per_user[user] >= settings.max_pairs_per_user:
            drops[f"{kind}_user_cap"] += 1
            continue
        per_conversation[conversation] += 1
        per_user[user] += 1
        kept.append(example)
    return _cap_share(kept, settings.max_user_share, drops, kind)


def _cap_share(kept: list[Example], share: float, drops: Counter[str], kind: str) -> list[Example]:
    """Trim users above ``share`` of the batch (lowest-ranked examples go first), repeatedly,
    since trimming shrinks the batch. Skipped while fewer than 1/share users make it impossible."""
    users = Counter(_user(e) for e in kept)
    if len(users) < math.ceil(1 / share - 1e-9):
        return kept
    while True:
        limit = max(1, math.floor(share * len(kept)))
        over = {u for u, n in users.items() if n > limit}
        if not over:
            return kept
        budget = dict.fromkeys(over, limit)
        trimmed: list[Example] = []
        for example in kept:
            user = _user(example)
            if user in budget:
                if budget[user] == 0:
                    drops[f"{kind}_user_share"] += 1
                    users[user] -= 1
                    continue
                budget[user] -= 1
            trimmed.append(example)
        kept = trimmed


def balance(unpaired: list[UnpairedRecord], drops: Counter[str]) -> list[UnpairedRecord]:
    """As many desirable as undesirable examples (the better-ranked ones of the larger class)."""
    good = [e for e in unpaired if e.label]
    bad = [e for e in unpaired if not e.label]
    n = min(len(good), len(bad))
    drops["kto_class_balance"] += len(good) - n + len(bad) - n
    keep = {e.id for e in good[:n]} | {e.id for e in bad[:n]}
    return [e for e in unpaired if e.id in keep]


def assemble(
    pairs: Sequence[PreferencePairRecord],
    unpaired: Sequence[UnpairedRecord],
    settings: LearnerSettings,
    drops: Counter[str] | None = None,
) -> Batch:
    batch = Batch(drops=Counter(drops or {}))
    batch.pairs = select(pairs, settings, batch.drops, "pair")
    batch.unpaired = select(unpaired, settings, batch.drops, "kto")
    if settings.kto_balance:
        batch.unpaired = balance(batch.unpaired, batch.drops)
    return batch
