"""The recorder: keeps the store in step with the event log.

It consumes chat turns, explicit feedback, turn labels and adapter lifecycle events and writes
each once (``services.worker`` deduplicates by event id; the store's natural keys absorb the
rest). A turn whose position in its conversation is already held by a different event is
dead-lettered rather than silently dropped or overwritten.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from services.bus.ports import EventBus
from services.bus.typed import EventPublisher
from services.events.schemas import (
    AdapterLifecycleChanged,
    FeedbackSubmitted,
    TurnLabeled,
    TurnLogged,
)
from services.metrics import Metrics
from services.settings import WildloopSettings
from services.store.repository import Store, WriteOutcome
from services.worker import ConsumerWorker, Handler, RejectedEventError

GROUP = "wildloop-recorder"


def handlers(store: Store) -> dict[type[Any], Handler]:
    def on_turn(event: TurnLogged, session: Session) -> None:
        if store.record_turn(session, event) is WriteOutcome.CONFLICT:
            raise RejectedEventError(
                f"turn {event.turn} of conversation {event.conversation_id!r} is already "
                f"recorded from a different event, or the conversation belongs to another tenant"
            )

    def on_feedback(event: FeedbackSubmitted, session: Session) -> None:
        store.record_feedback(session, event)

    def on_label(event: TurnLabeled, session: Session) -> None:
        store.record_label(session, event)

    def on_adapter(event: AdapterLifecycleChanged, session: Session) -> None:
        store.record_adapter_event(session, event)

    return {
        TurnLogged: on_turn,
        FeedbackSubmitted: on_feedback,
        TurnLabeled: on_label,
        AdapterLifecycleChanged: on_adapter,
    }


def build_recorder(
    settings: WildloopSettings, *, bus: EventBus, store: Store, metrics: Metrics
) -> ConsumerWorker:
    t = settings.topics
    topics = [t.chat_turns, t.explicit_feedback, t.labels, t.adapter_events]
    bus.ensure_topics([*topics, t.dead_letter])
    return ConsumerWorker(
        subscription=bus.subscribe(topics, group=GROUP),
        store=store,
        handlers=handlers(store),
        dead_letters=EventPublisher(bus.publisher(), t),
        metrics=metrics,
    )
