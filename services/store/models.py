"""The store's tables, as SQLAlchemy 2 typed models. The schema itself is owned by Alembic
(``services/store/migrations``); change a model, then add a migration.

Natural keys make every write idempotent: events by ``event_id``; labels by
(conversation, turn, detector version); preference pairs by their content hash.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Json = JSON().with_variant(JSON(none_as_null=True), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: Json}


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), index=True, default="default")
    user_id: Mapped[str | None] = mapped_column(String(256), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)

    turns: Mapped[list[Turn]] = relationship(
        back_populates="conversation", order_by="Turn.turn_index", lazy="raise"
    )


class Turn(Base):
    """One message of a conversation, in the position the conversation format gives it."""

    __tablename__ = "turns"
    __table_args__ = (UniqueConstraint("conversation_id", "turn_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    turn_index: Mapped[int]
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(256))
    adapter_id: Mapped[str | None] = mapped_column(String(128), index=True)
    request_id: Mapped[str | None] = mapped_column(String(128))
    tenant_id: Mapped[str] = mapped_column(String(128), default="default")
    user_id: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    occurred_at: Mapped[datetime]
    latency_ms: Mapped[float | None] = mapped_column(Float)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    partial: Mapped[bool] = mapped_column(Boolean, default=False)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="turns", lazy="raise")


class ExplicitFeedback(Base):
    __tablename__ = "explicit_feedback"
    __table_args__ = (Index("ix_explicit_feedback_conv_turn", "conversation_id", "turn_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    conversation_id: Mapped[str] = mapped_column(String(256))
    turn_index: Mapped[int]
    rating: Mapped[str] = mapped_column(String(8))
    comment: Mapped[str | None] = mapped_column(Text)
    tenant_id: Mapped[str] = mapped_column(String(128), default="default")
    user_id: Mapped[str | None] = mapped_column(String(256))
    occurred_at: Mapped[datetime]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class TurnLabel(Base):
    """A detector's label of one user turn; one per (conversation, turn, detector version)."""

    __tablename__ = "turn_labels"
    __table_args__ = (UniqueConstraint("conversation_id", "turn_index", "detector_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    conversation_id: Mapped[str] = mapped_column(String(256), index=True)
    turn_index: Mapped[int]
    detector_version: Mapped[str] = mapped_column(String(64))
    polarity: Mapped[str] = mapped_column(String(8), index=True)
    sat: Mapped[list[str]] = mapped_column(Json, default=list)
    dsat: Mapped[list[str]] = mapped_column(Json, default=list)
    category: Mapped[str] = mapped_column(String(32))
    confidence: Mapped[float] = mapped_column(Float)
    tier: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(256))
    adapter_id: Mapped[str | None] = mapped_column(String(128), index=True)
    tenant_id: Mapped[str] = mapped_column(String(128), default="default")
    missing_context: Mapped[bool] = mapped_column(Boolean, default=False)
    occurred_at: Mapped[datetime]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class PreferencePair(Base):
    """One preference example built from feedback (learner); ``id`` is its content hash."""

    __tablename__ = "preference_pairs"
    __table_args__ = (Index("ix_preference_pairs_conv_turn", "conversation_id", "turn_index"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "pair" (DPO) or "unpaired" (KTO)
    conversation_id: Mapped[str] = mapped_column(String(256))
    turn_index: Mapped[int]
    user_id: Mapped[str | None] = mapped_column(String(256))
    prompt: Mapped[list[dict[str, Any]]] = mapped_column(Json)
    chosen: Mapped[str | None] = mapped_column(Text)
    rejected: Mapped[str | None] = mapped_column(Text)
    label: Mapped[bool | None] = mapped_column(Boolean)
    strategy: Mapped[str] = mapped_column(String(32))
    checklist: Mapped[list[str]] = mapped_column(Json, default=list)
    detector_version: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    # Lineage and the example as written to a dataset (learner.records), for rebuilding batches.
    details: Mapped[dict[str, Any] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    used_by_run_id: Mapped[str | None] = mapped_column(
        ForeignKey("training_runs.id", ondelete="SET NULL"), index=True
    )


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    method: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued|running|succeeded|failed
    base_model: Mapped[str] = mapped_column(String(256))
    data_manifest_hash: Mapped[str | None] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Adapter(Base):
    """A LoRA adapter and where it stands (candidate, canary, production, rejected, retired)."""

    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterEvent(Base):
    """The adapter lifecycle log, as it arrived on the bus (audit trail)."""

    __tablename__ = "adapter_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    adapter_id: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(32))
    previous_adapter_id: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    occurred_at: Mapped[datetime]


class Evaluation(Base):
    """A gate decision: a candidate judged against a baseline adapter (or the base model)."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    candidate_adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), index=True
    )
    baseline_adapter_id: Mapped[str | None] = mapped_column(String(128))
    n_prompts: Mapped[int]
    wins: Mapped[int]
    losses: Mapped[int]
    ties: Mapped[int]
    win_rate: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))  # promote | reject
    judge: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DetectorPending(Base):
    """A user turn the detector holds until the answer it reacts to arrives (or ``due_at``)."""

    __tablename__ = "detector_pending"

    conversation_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    turn_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    detector_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    event: Mapped[dict[str, Any]] = mapped_column(Json)
    due_at: Mapped[datetime] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Lease(Base):
    """A named lock with an expiry, held by one process at a time (e.g. the learner's run)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime]


class ProcessedEvent(Base):
    """Event ids a consumer group has applied, so redelivered events are skipped."""

    __tablename__ = "processed_events"

    consumer: Mapped[str] = mapped_column(String(255), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A gateway API key. Only a SHA-256 digest of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public part, e.g. "k3f9..."
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    scopes: Mapped[list[str]] = mapped_column(Json, default=list)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
