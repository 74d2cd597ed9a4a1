"""What a detector tier sees (``TurnContext``) and what it answers (``Verdict``).

A tier is anything with ``name`` and ``judge(contexts) -> verdicts`` (``Tier``): batch in, batch
out, same order, one verdict per context, never raising for odd text (empty, huge, binary-ish):
an unusable input gets a NEUTRAL verdict with low confidence. Polarity is derived from the
rubrics, never stored separately, so the two cannot disagree: both kinds present -> MIXED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from services.events.schemas import DsatRubric, FeedbackCategory, Polarity, SatRubric

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class TurnContext:
    """One user turn to judge, with what came before it.

    ``turn`` is the user message's 0-based index in the conversation (FORMATS.md);
    ``previous_assistant`` the assistant answer it reacts to (``None`` when that answer never
    arrived: ``missing_context``); ``history`` the messages before that answer, oldest first,
    already cut to the configured window.
    """

    conversation_id: str
    turn: int
    user: str
    previous_assistant: str | None
    history: tuple[Message, ...] = ()
    language: str | None = None  # optional hint (ISO 639-1), tiers may ignore it

    @property
    def missing_context(self) -> bool:
        return self.previous_assistant is None


@dataclass(frozen=True, slots=True)
class Verdict:
    sat: frozenset[SatRubric] = field(default_factory=frozenset)
    dsat: frozenset[DsatRubric] = field(default_factory=frozenset)
    category: FeedbackCategory = FeedbackCategory.NONE
    confidence: float = 0.5  # calibrated probability that the polarity is right
    tier: str = "unknown"
    failed: bool = False  # the tier could not judge (endpoint down, unusable input)

    @property
    def polarity(self) -> Polarity:
        return polarity_of(self.sat, self.dsat)

    def with_tier(self, tier: str) -> Verdict:
        return Verdict(self.sat, self.dsat, self.category, self.confidence, tier, self.failed)


def polarity_of(sat: frozenset[SatRubric], dsat: frozenset[DsatRubric]) -> Polarity:
    if sat and dsat:
        return Polarity.MIXED
    if sat:
        return Polarity.SAT
    if dsat:
        return Polarity.DSAT
    return Polarity.NEUTRAL


def failure(tier: str) -> Verdict:
    """What a tier answers for a turn it could not judge: the cascade keeps an earlier tier's
    verdict for it, or, if there is none, labels it NEUTRAL with confidence 0."""
    return Verdict(confidence=0.0, tier=tier, failed=True)


@runtime_checkable
class Tier(Protocol):
    """A detector tier. ``judge`` must be safe to call from one thread at a time."""

    name: str

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]: ...


def judge_guarded(
    name: str,
    contexts: Sequence[TurnContext],
    usable: Callable[[TurnContext], object],
    judge: Callable[[Sequence[TurnContext]], list[Verdict]],
) -> list[Verdict]:
    """``judge`` applied to the ``usable`` contexts as one batch; the others get ``failure``.
    A batch that raises is retried turn by turn, and a turn that still raises gets ``failure``,
    so one bad turn never costs its batch-mates their verdicts."""
    verdicts: list[Verdict] = [failure(name)] * len(contexts)
    chosen = [i for i, c in enumerate(contexts) if usable(c)]
    if not chosen:
        return verdicts
    try:
        judged = judge([contexts[i] for i in chosen])
    except Exception:
        log.exception("%s batch failed; judging its turns one by one", name)
        judged = []
        for i in chosen:
            try:
                judged.extend(judge([contexts[i]]))
            except Exception:
                log.exception("%s failed on one turn", name, extra={"turn": contexts[i].turn})
                judged.append(failure(name))
    for i, verdict in zip(chosen, judged, strict=True):
        verdicts[i] = verdict
    return verdicts
