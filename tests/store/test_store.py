"""The store on SQLite and on a real PostgreSQL: migrations, idempotent writes, reads."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import inspect

from services.conversations import turn_events
from services.events.schemas import (
    AdapterAction,
    AdapterLifecycleChanged,
    DsatRubric,
    FeedbackSubmitted,
    Polarity,
    Rating,
    Role,
    TurnLabeled,
    TurnLogged,
)
from services.formats import ConversationRecord
from services.store import db
from services.store.repository import Store, WriteOutcome

TABLES = {
    "conversations",
    "turns",
    "explicit_feedback",
    "turn_labels",
    "preference_pairs",
    "training_runs",
    "adapters",
    "adapter_events",
    "evaluations",
    "processed_events",
    "alembic_version",
}


def turn(conv: str, index: int, content: str = "hi", **kw: object) -> TurnLogged:
    role = Role.USER if index % 2 == 0 else Role.ASSISTANT
    return TurnLogged(conversation_id=conv, turn=index, role=role, content=content, **kw)


def label(conv: str, index: int, version: str = "v1") -> TurnLabeled:
    return TurnLabeled(
        conversation_id=conv,
        turn=index,
        polarity=Polarity.DSAT,
        dsat=[DsatRubric.REVISION],
        confidence=0.9,
        tier="rules",
        detector_version=version,
    )


def test_opening_an_empty_database_migrates_it_to_the_newest_schema(store: Store) -> None:
    assert set(inspect(store.engine).get_table_names()) >= TABLES
    assert db.current_revision(store.engine) == db.head_revision()


def test_opening_again_and_concurrently_is_harmless(store_url: str) -> None:
    errors: list[BaseException] = []

    def open_once() -> None:
        try:
            Store.open(store_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_once) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_turn_event_is_recorded_once_however_often_it_arrives(store: Store) -> None:
    event = turn("c1", 0, "hello", model="m", adapter_id="a1", latency_ms=12.5)
    with store.transaction() as s:
        assert store.record_turn(s, event) is WriteOutcome.INSERTED
    with store.transaction() as s:
        assert store.record_turn(s, event) is WriteOutcome.DUPLICATE
    assert store.count_turns() == 1


def test_a_different_event_for_an_occupied_turn_is_a_conflict_not_an_overwrite(
    store: Store,
) -> None:
    with store.transaction() as s:
        store.record_turn(s, turn("c1", 0, "original"))
    with store.transaction() as s:
        assert store.record_turn(s, turn("c1", 0, "impostor")) is WriteOutcome.CONFLICT
    record = store.get_conversation("c1")
    assert record is not None and record.messages[0].content == "original"


def test_one_label_per_turn_and_detector_version(store: Store) -> None:
    with store.transaction() as s:
        assert store.record_label(s, label("c1", 2, "v1")) is WriteOutcome.INSERTED
        assert store.record_label(s, label("c1", 2, "v1")) is WriteOutcome.DUPLICATE
        assert store.record_label(s, label("c1", 2, "v2")) is WriteOutcome.INSERTED
    assert [(x.turn_index, x.detector_version) for x in store.labels_for("c1")] == [
        (2, "v1"),
        (2, "v2"),
    ]


def test_feedback_and_adapter_events_are_idempotent_on_event_id(store: Store) -> None:
    fb = FeedbackSubmitted(conversation_id="c1", turn=1, rating=Rating.DOWN, comment="meh")
    ad = AdapterLifecycleChanged(adapter_id="a1", action=AdapterAction.PROMOTED)
    with store.transaction() as s:
        assert store.record_feedback(s, fb) is WriteOutcome.INSERTED
        assert store.record_adapter_event(s, ad) is WriteOutcome.INSERTED
    with store.transaction() as s:
        assert store.record_feedback(s, fb) is WriteOutcome.DUPLICATE
        assert store.record_adapter_event(s, ad) is WriteOutcome.DUPLICATE
    assert [(f.rating, f.comment) for f in store.feedback_for("c1")] == [("down", "meh")]


def test_processed_markers_tell_a_consumer_what_it_already_applied(store: Store) -> None:
    with store.transaction() as s:
        assert store.mark_processed(s, consumer="g", event_id="e1")
        assert not store.mark_processed(s, consumer="g", event_id="e1")
        assert store.mark_processed(s, consumer="other", event_id="e1")


def test_a_failed_transaction_leaves_nothing_half_written(store: Store) -> None:
    try:
        with store.transaction() as s:
            store.record_turn(s, turn("c1", 0))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert store.count_turns() == 0
    assert store.count_conversations() == 0


def test_export_round_trips_the_conversation_format_with_unknown_keys(store: Store) -> None:
    record = ConversationRecord.model_validate(
        {
            "conversation_id": "c-42",
            "source": "wildchat",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi", "lang": "en"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Thanks ✨"},
            ],
        }
    )
    with store.transaction() as s:
        for event in reversed(turn_events(record)):  # arrival order does not matter
            store.record_turn(s, event)
    exported = list(store.iter_conversations())
    assert [r.model_dump(mode="json") for r in exported] == [record.model_dump(mode="json")]


def test_listing_is_newest_first_and_scoped_to_a_tenant(store: Store) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with store.transaction() as s:
        for i, tenant in enumerate(["a", "a", "b"]):
            store.record_turn(
                s, turn(f"c{i}", 0, tenant_id=tenant, occurred_at=t0 + timedelta(minutes=i))
            )
        store.record_turn(s, turn("c0", 1, tenant_id="a", occurred_at=t0 + timedelta(hours=1)))
    assert [c.conversation_id for c in store.list_conversations()] == ["c0", "c2", "c1"]
    assert [c.conversation_id for c in store.list_conversations(tenant_id="a")] == ["c0", "c1"]
    assert [c.turns for c in store.list_conversations(tenant_id="a")] == [2, 1]
    assert store.get_conversation("c2", tenant_id="a") is None
    assert store.get_conversation("c2", tenant_id="b") is not None


def test_export_streams_in_batches_and_sees_every_conversation(store: Store) -> None:
    with store.transaction() as s:
        for i in range(25):
            store.record_turn(s, turn(f"c{i:02}", 0))
    ids = [r.conversation_id for r in store.iter_conversations(batch_size=7)]
    assert ids == [f"c{i:02}" for i in range(25)]


def test_a_turn_never_joins_another_tenant_s_conversation(store: Store) -> None:
    with store.transaction() as s:
        store.record_turn(s, turn("c1", 0, tenant_id="a"))
    with store.transaction() as s:
        assert store.record_turn(s, turn("c1", 1, tenant_id="b")) is WriteOutcome.CONFLICT
    record = store.get_conversation("c1")
    assert record is not None and len(record.messages) == 1
