"""Labelled conversations, whether they come from the store or from files.

The builder needs, per conversation, its messages, who the user is (for the per-user caps) and
one feedback signal per judged user turn (thumbs on assistant message ``t`` count as the
signal of turn ``t + 1``, as the detector records them). Several labels may exist for a turn
(several detector versions, and the detector's explicit-thumbs label); ``pick_signal`` chooses
one: an explicit thumbs label first, then the configured detector version, then the most
confident label.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services.formats import ConversationRecord, LabelRecord, LineError, read_jsonl
from services.store.learning import StoredConversation

EXPLICIT_TIER = "explicit"


@dataclass(frozen=True, slots=True)
class Signal:
    """The feedback a user turn gives on the assistant message before it."""

    polarity: str  # SAT | DSAT | MIXED | NEUTRAL
    sat: tuple[str, ...]
    dsat: tuple[str, ...]
    confidence: float
    tier: str
    detector_version: str
    comment: str | None = None  # explicit feedback's text, if any

    @property
    def is_dsat(self) -> bool:
        return self.polarity in ("DSAT", "MIXED")


@dataclass(frozen=True, slots=True)
class LabelledConversation:
    conversation_id: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    signals: dict[int, Signal] = field(default_factory=dict)  # user turn index -> signal
    user_id: str | None = None
    tenant_id: str = "default"
    # When its last message was logged (live conversations); None for files (complete).
    last_activity: datetime | None = None


def pick_signal(candidates: list[Signal], detector_version: str | None) -> Signal | None:
    if not candidates:
        return None
    explicit = [s for s in candidates if s.tier.startswith(EXPLICIT_TIER)]
    if explicit:
        return explicit[-1]
    if detector_version is not None:
        candidates = [s for s in candidates if s.detector_version == detector_version]
        if not candidates:
            return None
    return max(candidates, key=lambda s: s.confidence)


def _messages(record: ConversationRecord) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, m.content) for m in record.messages)


def from_store(
    rows: Iterable[StoredConversation], *, detector_version: str | None = None
) -> Iterator[LabelledConversation]:
    for row in rows:
        by_turn: dict[int, list[Signal]] = {}
        for label in row.labels:
            by_turn.setdefault(label.turn_index, []).append(
                Signal(
                    polarity=label.polarity,
                    sat=tuple(label.sat or ()),
                    dsat=tuple(label.dsat or ()),
                    confidence=label.confidence,
                    tier=label.tier,
                    detector_version=label.detector_version,
                )
            )
        # Thumbs on assistant message t label the user turn t + 1 (the detector's convention).
        comments = {f.turn_index + 1: f.comment for f in row.feedback if f.comment}
        signals: dict[int, Signal] = {}
        for turn, candidates in by_turn.items():
            chosen = pick_signal(candidates, detector_version)
            if chosen is not None:
                if chosen.tier.startswith(EXPLICIT_TIER) and turn in comments:
                    chosen = _with_comment(chosen, comments[turn])
                signals[turn] = chosen
        yield LabelledConversation(
            conversation_id=row.record.conversation_id,
            messages=_messages(row.record),
            signals=signals,
            user_id=row.user_id,
            tenant_id=row.tenant_id,
            last_activity=row.updated_at,
        )


def _with_comment(signal: Signal, comment: str | None) -> Signal:
    return Signal(
        signal.polarity,
        signal.sat,
        signal.dsat,
        signal.confidence,
        signal.tier,
        signal.detector_version,
        comment,
    )


@dataclass
class FileCorpus:
    conversations: list[LabelledConversation]
    errors: list[tuple[str, LineError]]  # (file name, error)
    unmatched_labels: int  # labels of conversations or turns the conversation file lacks


def from_files(
    conversations: Path, labels: Path, *, detector_version: str | None = None
) -> FileCorpus:
    """Read the FORMATS.md conversation and label files. Malformed lines are returned as errors
    (and skipped), never raised. Conversations keep their ``user_id`` / ``tenant_id`` extra keys
    when they have them."""
    errors: list[tuple[str, LineError]] = []
    by_turn: dict[tuple[str, int], list[Signal]] = {}
    with labels.open(encoding="utf-8", errors="replace") as fh:
        for _, item in read_jsonl(fh, LabelRecord):
            if isinstance(item, LineError):
                errors.append((labels.name, item))
                continue
            extras = item.model_extra or {}
            by_turn.setdefault((item.conversation_id, item.turn), []).append(
                Signal(
                    polarity=item.polarity,
                    sat=tuple(item.sat),
                    dsat=tuple(item.dsat),
                    confidence=item.confidence,
                    tier=item.tier,
                    detector_version=str(extras.get("detector_version", "file")),
                    comment=extras.get("comment")
                    if isinstance(extras.get("comment"), str)
                    else None,
                )
            )
    out: list[LabelledConversation] = []
    matched = 0
    with conversations.open(encoding="utf-8", errors="replace") as fh:
        for _, record in read_jsonl(fh, ConversationRecord):
            if isinstance(record, LineError):
                errors.append((conversations.name, record))
                continue
            signals: dict[int, Signal] = {}
            for turn in record.labelable_turns():
                chosen = pick_signal(
                    by_turn.get((record.conversation_id, turn), []), detector_version
                )
                if chosen is not None:
                    signals[turn] = chosen
                    matched += len(by_turn[(record.conversation_id, turn)])
            extras = record.extras
            user = extras.get("user_id")
            tenant = extras.get("tenant_id")
            out.append(
                LabelledConversation(
                    conversation_id=record.conversation_id,
                    messages=_messages(record),
                    signals=signals,
                    user_id=str(user) if user is not None else None,
                    tenant_id=str(tenant) if tenant is not None else "default",
                )
            )
    total = sum(len(v) for v in by_turn.values())
    return FileCorpus(out, errors, unmatched_labels=total - matched)
