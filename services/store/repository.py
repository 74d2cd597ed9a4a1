"""Data access for the store. Writes are idempotent on natural keys; functions that take a
``Session`` run inside the caller's transaction so a consumer can apply an event and mark it
processed atomically."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.events.schemas import (
    AdapterLifecycleChanged,
    FeedbackSubmitted,
    TurnLabeled,
    TurnLogged,
)
from services.formats import ConversationRecord, MessageRecord
from services.store import db
from services.store.models import (
    Adapter,
    AdapterEvent,
    Base,
    Conversation,
    DetectorPending,
    ExplicitFeedback,
    ProcessedEvent,
    Turn,
    TurnLabel,
)


class WriteOutcome(StrEnum):
    INSERTED = "inserted"
    DUPLICATE = "duplicate"  # the same event (or natural key) was recorded before
    CONFLICT = "conflict"  # a different event already holds this natural key


class StoreConflictError(ValueError):
    """A write collided with a different record holding the same natural key."""


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conversation_id: str
    tenant_id: str
    user_id: str | None
    turns: int
    created_at: datetime
    updated_at: datetime


class Store:
    """The store. Build with :meth:`open` (applies migrations) or from an existing engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Store:
        engine = db.make_engine(url)
        if migrate:
            db.upgrade(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on success and rolls back on error."""
        with self._sessions.begin() as session:
            yield session

    # -- idempotent writes ---------------------------------------------------------------------
    def _insert_ignore(self, session: Session, model: type[Base], values: dict[str, Any]) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING; True when a row was inserted."""
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        # RETURNING tells reliably whether a row went in (rowcount does not on every driver).
        stmt = (
            insert(model.__table__)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(literal_column("1"))
        )
        return session.connection().execute(stmt).first() is not None

    def mark_processed(self, session: Session, *, consumer: str, event_id: str) -> bool:
        """Record that ``consumer`` applied ``event_id``; False if it already had."""
        return self._insert_ignore(
            session, ProcessedEvent, {"consumer": consumer, "event_id": event_id}
        )

    def record_turn(self, session: Session, event: TurnLogged) -> WriteOutcome:
        self._insert_ignore(
            session,
            Conversation,
            {
                "id": event.conversation_id,
                "tenant_id": event.tenant_id,
                "user_id": event.user_id,
                "created_at": event.occurred_at,
                "updated_at": event.occurred_at,
                "extra": {},
            },
        )
        owner = session.scalar(
            select(Conversation.tenant_id).where(Conversation.id == event.conversation_id)
        )
        if owner != event.tenant_id:  # another tenant's conversation: never mix them
            return WriteOutcome.CONFLICT
        conv_extra = event.extra.get("conversation")
        if isinstance(conv_extra, dict) and conv_extra:
            session.execute(
                update(Conversation)
                .where(Conversation.id == event.conversation_id)
                .values(extra=conv_extra)
            )
        inserted = self._insert_ignore(
            session,
            Turn,
            {
                "event_id": event.event_id,
                "conversation_id": event.conversation_id,
                "turn_index": event.turn,
                "role": event.role.value,
                "content": event.content,
                "model": event.model,
                "adapter_id": event.adapter_id,
                "request_id": event.request_id,
                "tenant_id": event.tenant_id,
                "user_id": event.user_id,
                "started_at": event.started_at,
                "completed_at": event.completed_at,
                "occurred_at": event.occurred_at,
                "latency_ms": event.latency_ms,
                "time_to_first_token_ms": event.time_to_first_token_ms,
                "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens,
                "partial": event.partial,
                "extra": {k: v for k, v in event.extra.items() if k != "conversation"},
            },
        )
        if inserted:
            session.execute(
                update(Conversation)
                .where(
                    Conversation.id == event.conversation_id,
                    Conversation.updated_at < event.occurred_at,
                )
                .values(updated_at=event.occurred_at)
            )
            return WriteOutcome.INSERTED
        holder = session.scalar(
            select(Turn.event_id).where(
                Turn.conversation_id == event.conversation_id, Turn.turn_index == event.turn
            )
        )
        return WriteOutcome.DUPLICATE if holder == event.event_id else WriteOutcome.CONFLICT

    def record_feedback(self, session: Session, event: FeedbackSubmitted) -> WriteOutcome:
        inserted = self._insert_ignore(
            session,
            ExplicitFeedback,
            {
                "event_id": event.event_id,
                "conversation_id": event.conversation_id,
                "turn_index": event.turn,
                "rating": event.rating.value,
                "comment": event.comment,
                "tenant_id": event.tenant_id,
                "user_id": event.user_id,
                "occurred_at": event.occurred_at,
            },
        )
        return WriteOutcome.INSERTED if inserted else WriteOutcome.DUPLICATE

    def record_label(self, session: Session, event: TurnLabeled) -> WriteOutcome:
        """One label per (conversation, turn, detector version); the first one wins."""
        inserted = self._insert_ignore(
            session,
            TurnLabel,
            {
                "event_id": event.event_id,
                "conversation_id": event.conversation_id,
                "turn_index": event.turn,
                "detector_version": event.detector_version,
                "polarity": event.polarity.value,
                "sat": [r.value for r in event.sat],
                "dsat": [r.value for r in event.dsat],
                "category": event.category.value,
                "confidence": event.confidence,
                "tier": event.tier,
                "model": event.model,
                "adapter_id": event.adapter_id,
                "tenant_id": event.tenant_id,
                "missing_context": event.missing_context,
                "occurred_at": event.occurred_at,
            },
        )
        return WriteOutcome.INSERTED if inserted else WriteOutcome.DUPLICATE

    def record_adapter_event(
        self, session: Session, event: AdapterLifecycleChanged
    ) -> WriteOutcome:
        inserted = self._insert_ignore(
            session,
            AdapterEvent,
            {
                "event_id": event.event_id,
                "adapter_id": event.adapter_id,
                "action": event.action.value,
                "previous_adapter_id": event.previous_adapter_id,
                "reason": event.reason,
                "actor": event.actor,
                "details": dict(event.details),
                "occurred_at": event.occurred_at,
            },
        )
        return WriteOutcome.INSERTED if inserted else WriteOutcome.DUPLICATE

    # -- the detector's waiting turns -----------------------------------------------------------
    def hold_turn(
        self,
        session: Session,
        *,
        conversation_id: str,
        turn: int,
        detector_version: str,
        event: dict[str, Any],
        due_at: datetime,
    ) -> bool:
        """Keep a user turn until its context arrives; False if it was already held."""
        return self._insert_ignore(
            session,
            DetectorPending,
            {
                "conversation_id": conversation_id,
                "turn_index": turn,
                "detector_version": detector_version,
                "event": event,
                "due_at": due_at,
            },
        )

    def release_turn(
        self, session: Session, *, conversation_id: str, turn: int, detector_version: str
    ) -> dict[str, Any] | None:
        """Remove a held turn and return its event, or None if it was not held."""
        row = session.get(DetectorPending, (conversation_id, turn, detector_version))
        if row is None:
            return None
        event = dict(row.event)
        session.delete(row)
        return event

    def held_turns_due(
        self, *, detector_version: str, now: datetime, limit: int = 500
    ) -> list[tuple[str, int]]:
        """(conversation, turn) of held turns whose wait is over, oldest first."""
        with self.transaction() as session:
            rows = session.execute(
                select(DetectorPending.conversation_id, DetectorPending.turn_index)
                .where(
                    DetectorPending.detector_version == detector_version,
                    DetectorPending.due_at <= now,
                )
                .order_by(DetectorPending.due_at)
                .limit(limit)
            ).all()
        return [(c, t) for c, t in rows]

    def messages_before(
        self, conversation_id: str, turn: int, *, limit: int
    ) -> list[tuple[int, str, str, str | None]]:
        """The recorded messages before ``turn`` (newest ``limit``), oldest first, as
        (turn, role, content, adapter_id)."""
        with self.transaction() as session:
            rows = session.execute(
                select(Turn.turn_index, Turn.role, Turn.content, Turn.adapter_id)
                .where(Turn.conversation_id == conversation_id, Turn.turn_index < turn)
                .order_by(Turn.turn_index.desc())
                .limit(limit)
            ).all()
        return [(t, r, c, a) for t, r, c, a in reversed(rows)]

    # -- reads ----------------------------------------------------------------------------------
    def label_polarities(self, *, tenant_id: str) -> dict[str, list[tuple[int, str]]]:
        """conversation -> [(turn, polarity)] of a tenant's labels, in turn order."""
        with self.transaction() as session:
            rows = session.execute(
                select(TurnLabel.conversation_id, TurnLabel.turn_index, TurnLabel.polarity)
                .where(TurnLabel.tenant_id == tenant_id)
                .order_by(TurnLabel.conversation_id, TurnLabel.turn_index)
            ).all()
        found: dict[str, list[tuple[int, str]]] = {}
        for conversation, turn, polarity in rows:
            found.setdefault(conversation, []).append((turn, polarity))
        return found

    def list_conversations(
        self, *, tenant_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[ConversationSummary]:
        turns = (
            select(Turn.conversation_id, func.count().label("n"))
            .group_by(Turn.conversation_id)
            .subquery()
        )
        stmt = (
            select(Conversation, func.coalesce(turns.c.n, 0))
            .outerjoin(turns, turns.c.conversation_id == Conversation.id)
            .order_by(Conversation.updated_at.desc(), Conversation.id)
            .limit(limit)
            .offset(offset)
        )
        if tenant_id is not None:
            stmt = stmt.where(Conversation.tenant_id == tenant_id)
        with self._sessions() as session:
            return [
                ConversationSummary(
                    c.id, c.tenant_id, c.user_id, int(n), c.created_at, c.updated_at
                )
                for c, n in session.execute(stmt)
            ]

    def count_conversations(self, *, tenant_id: str | None = None) -> int:
        stmt = select(func.count()).select_from(Conversation)
        if tenant_id is not None:
            stmt = stmt.where(Conversation.tenant_id == tenant_id)
        with self._sessions() as session:
            return int(session.scalar(stmt) or 0)

    def get_conversation(
        self, conversation_id: str, *, tenant_id: str | None = None
    ) -> ConversationRecord | None:
        with self._sessions() as session:
            conv = session.get(Conversation, conversation_id)
            if conv is None or (tenant_id is not None and conv.tenant_id != tenant_id):
                return None
            turns = session.scalars(
                select(Turn)
                .where(Turn.conversation_id == conversation_id)
                .order_by(Turn.turn_index)
            ).all()
            return _to_record(conv, turns)

    def iter_conversations(
        self, *, tenant_id: str | None = None, batch_size: int = 200
    ) -> Iterator[ConversationRecord]:
        """Every conversation with its messages, in id order, in bounded memory."""
        last_id = ""
        while True:
            with self._sessions() as session:
                stmt = (
                    select(Conversation)
                    .where(Conversation.id > last_id)
                    .order_by(Conversation.id)
                    .limit(batch_size)
                )
                if tenant_id is not None:
                    stmt = stmt.where(Conversation.tenant_id == tenant_id)
                convs = session.scalars(stmt).all()
                if not convs:
                    return
                by_conv: dict[str, list[Turn]] = {c.id: [] for c in convs}
                for turn in session.scalars(
                    select(Turn)
                    .where(Turn.conversation_id.in_(list(by_conv)))
                    .order_by(Turn.conversation_id, Turn.turn_index)
                ):
                    by_conv[turn.conversation_id].append(turn)
            for conv in convs:
                yield _to_record(conv, by_conv[conv.id])
            last_id = convs[-1].id

    def labels_for(self, conversation_id: str) -> list[TurnLabel]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(TurnLabel)
                    .where(TurnLabel.conversation_id == conversation_id)
                    .order_by(TurnLabel.turn_index, TurnLabel.detector_version)
                )
            )

    def feedback_for(self, conversation_id: str) -> list[ExplicitFeedback]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(ExplicitFeedback)
                    .where(ExplicitFeedback.conversation_id == conversation_id)
                    .order_by(ExplicitFeedback.turn_index, ExplicitFeedback.occurred_at)
                )
            )

    def production_adapter(self) -> Adapter | None:
        """The adapter in production (the newest promoted one), or None for the base model."""
        with self._sessions() as session:
            return session.scalars(
                select(Adapter)
                .where(Adapter.status == "production")
                .order_by(Adapter.updated_at.desc())
                .limit(1)
            ).first()

    def count_turns(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Turn)) or 0)


def _to_record(conv: Conversation, turns: Sequence[Turn]) -> ConversationRecord:
    messages = [
        MessageRecord.model_validate({**(t.extra or {}), "role": t.role, "content": t.content})
        for t in turns
    ]
    return ConversationRecord.model_validate(
        {**(conv.extra or {}), "conversation_id": conv.id, "messages": messages}
    )
