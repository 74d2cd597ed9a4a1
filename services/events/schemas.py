"""Versioned wire contracts of every event wildloop puts on its log.

Events are small immutable records named in the past tense. Each carries a globally unique
``event_id`` (consumers deduplicate on it), an ``event_type`` discriminator and a
``schema_version``. A consumer accepts every version up to the one it was built with and
dead-letters newer ones, so producers can be upgraded after consumers.

This module imports nothing of the project.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1


def new_event_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class Polarity(StrEnum):
    SAT = "SAT"
    DSAT = "DSAT"
    MIXED = "MIXED"
    NEUTRAL = "NEUTRAL"


class SatRubric(StrEnum):
    """The nine satisfaction rubrics of WildFeedback (appendix A.1)."""

    GRATITUDE = "Gratitude"
    LEARNING = "Learning"
    COMPLIANCE = "Compliance"
    PRAISE = "Praise"
    PERSONAL_DETAILS = "Personal_Details"
    HUMOR = "Humor"
    ACKNOWLEDGMENT = "Acknowledgment"
    POSITIVE_CLOSURE = "Positive_Closure"
    GETTING_THERE = "Getting_There"


class DsatRubric(StrEnum):
    """The nine dissatisfaction rubrics of WildFeedback (appendix A.1)."""

    NEGATIVE_FEEDBACK = "Negative_Feedback"
    REVISION = "Revision"
    FACTUAL_ERROR = "Factual_Error"
    UNREALISTIC_EXPECTATION = "Unrealistic_Expectation"
    NO_ENGAGEMENT = "No_Engagement"
    IGNORED = "Ignored"
    LOWER_QUALITY = "Lower_Quality"
    INSUFFICIENT_DETAIL = "Insufficient_Detail"
    STYLE = "Style"


class FeedbackCategory(StrEnum):
    """Natural feedback categories of Don-Yehiya et al."""

    REPHRASE = "rephrase"
    AWARE_WITH_CORRECTION = "aware_with_correction"
    AWARE_WITHOUT_CORRECTION = "aware_without_correction"
    CLARIFICATION = "clarification"
    POSITIVE = "positive"
    NONE = "none"


class Rating(StrEnum):
    UP = "up"
    DOWN = "down"


class AdapterAction(StrEnum):
    """Steps of an adapter's life, in the order they usually happen."""

    TRAINED = "trained"
    CANDIDATE_REGISTERED = "candidate_registered"
    EVALUATED = "evaluated"
    REJECTED = "rejected"
    CANARY_STARTED = "canary_started"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    LOADED = "loaded"
    UNLOADED = "unloaded"
    RETIRED = "retired"


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", use_enum_values=False)

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=128)
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    occurred_at: datetime = Field(default_factory=utcnow)

    @field_validator("occurred_at", mode="after")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @property
    def partition_key(self) -> str:  # pragma: no cover - overridden by every event
        raise NotImplementedError


class TurnLogged(_Event):
    """One message of a conversation, as the gateway saw it.

    ``turn`` is the message's 0-based index in the conversation, counting every message including
    a leading system message (the "turn i" of the conversation format).
    """

    event_type: Literal["turn.logged"] = "turn.logged"
    conversation_id: str = Field(min_length=1, max_length=256)
    turn: int = Field(ge=0)
    role: Role
    content: str
    model: str | None = None
    adapter_id: str | None = None
    request_id: str | None = None
    tenant_id: str = "default"
    user_id: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    partial: bool = Field(
        default=False, description="The client went away before the answer was complete."
    )
    extra: dict[str, object] = Field(
        default_factory=dict,
        description="Unknown keys of an imported message, kept so exports can preserve them.",
    )

    @property
    def partition_key(self) -> str:
        return self.conversation_id


class FeedbackSubmitted(_Event):
    """Explicit feedback (thumbs up/down, optional comment) on one assistant turn."""

    event_type: Literal["feedback.submitted"] = "feedback.submitted"
    conversation_id: str = Field(min_length=1, max_length=256)
    turn: int = Field(ge=0, description="Index of the assistant message the feedback is about.")
    rating: Rating
    comment: str | None = Field(default=None, max_length=10_000)
    tenant_id: str = "default"
    user_id: str | None = None

    @property
    def partition_key(self) -> str:
        return self.conversation_id


class TurnLabeled(_Event):
    """The detector's judgement of one user turn (the turn-label format, plus provenance)."""

    event_type: Literal["turn.labeled"] = "turn.labeled"
    conversation_id: str = Field(min_length=1, max_length=256)
    turn: int = Field(ge=0)
    polarity: Polarity
    sat: list[SatRubric] = Field(default_factory=list)
    dsat: list[DsatRubric] = Field(default_factory=list)
    category: FeedbackCategory = FeedbackCategory.NONE
    confidence: float = Field(ge=0.0, le=1.0)
    tier: str = Field(min_length=1, max_length=64)
    detector_version: str = Field(min_length=1, max_length=64)
    model: str | None = None
    adapter_id: str | None = None
    tenant_id: str = "default"
    missing_context: bool = False

    @property
    def partition_key(self) -> str:
        return self.conversation_id

    def to_label_record(self) -> dict[str, object]:
        """The public turn-label JSON Lines record (FORMATS.md)."""
        return {
            "conversation_id": self.conversation_id,
            "turn": self.turn,
            "polarity": self.polarity.value,
            "sat": [r.value for r in self.sat],
            "dsat": [r.value for r in self.dsat],
            "category": self.category.value,
            "confidence": self.confidence,
            "tier": self.tier,
        }


class AdapterLifecycleChanged(_Event):
    """An adapter moved one step in its life (trained, evaluated, promoted, rolled back...)."""

    event_type: Literal["adapter.lifecycle_changed"] = "adapter.lifecycle_changed"
    adapter_id: str = Field(min_length=1, max_length=128)
    action: AdapterAction
    base_model: str | None = None
    path: str | None = None
    run_id: str | None = None
    previous_adapter_id: str | None = None
    reason: str | None = None
    actor: str = "system"
    details: dict[str, object] = Field(default_factory=dict)

    @property
    def partition_key(self) -> str:
        return self.adapter_id


class EventDeadLettered(_Event):
    """A record a consumer could not use, with the reason and the raw bytes (base64)."""

    event_type: Literal["event.dead_lettered"] = "event.dead_lettered"
    source_topic: str
    source_partition: int
    source_offset: int
    source_key: str | None = None
    consumer_group: str
    reason: str
    raw_base64: str

    @property
    def partition_key(self) -> str:
        return self.source_key or f"{self.source_topic}/{self.source_partition}"


Event = Annotated[
    TurnLogged | FeedbackSubmitted | TurnLabeled | AdapterLifecycleChanged | EventDeadLettered,
    Field(discriminator="event_type"),
]

EVENT_TYPES: dict[str, type[_Event]] = {
    "turn.logged": TurnLogged,
    "feedback.submitted": FeedbackSubmitted,
    "turn.labeled": TurnLabeled,
    "adapter.lifecycle_changed": AdapterLifecycleChanged,
    "event.dead_lettered": EventDeadLettered,
}
