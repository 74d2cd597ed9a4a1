"""The learner service on a real store and event log: stored feedback becomes examples, a run
registers a candidate adapter, a failed run registers nothing, and one run at a time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from learner.metrics import LearnerMetrics
from learner.service import LEASE, LearnerService
from learner.training import train_adapter
from services.bus.embedded import EmbeddedEventLog
from services.bus.typed import EventPublisher
from services.events.codec import decode
from services.events.schemas import (
    AdapterAction,
    AdapterLifecycleChanged,
    Polarity,
    Role,
    TurnLabeled,
    TurnLogged,
)
from services.metrics import Metrics
from services.settings import LearnerSettings, Topics, WildloopSettings
from services.store.learning import LearningStore
from services.store.models import Adapter, PreferencePair, TrainingRun
from services.store.repository import Store
from tests.bus.helpers import settle
from tests.conftest import embedded_log
from tests.learner.conftest import small_training
from tests.learner.corpus import CONVERSATIONS, LABELS, honest


def record_corpus(store: Store, convs: list[dict[str, Any]], labels: list[dict[str, Any]]) -> None:
    """Write conversations and labels the way the recorder does, from events."""
    with store.transaction() as session:
        for c in convs:
            for i, m in enumerate(c["messages"]):
                store.record_turn(
                    session,
                    TurnLogged(
                        conversation_id=c["conversation_id"],
                        turn=i,
                        role=Role(m["role"]),
                        content=m["content"],
                        user_id=c.get("user_id"),
                    ),
                )
        for lb in labels:
            store.record_label(
                session,
                TurnLabeled(
                    conversation_id=lb["conversation_id"],
                    turn=lb["turn"],
                    polarity=Polarity(lb["polarity"]),
                    sat=lb["sat"],
                    dsat=lb["dsat"],
                    confidence=lb["confidence"],
                    tier=lb["tier"],
                    detector_version="rules-test",
                ),
            )


@pytest.fixture
def corpus() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    convs, labels = list(CONVERSATIONS), list(LABELS)
    for k, user in enumerate(("u1", "u2", "u3")):
        more, more_labels = honest(user, 2, start=2 * k)
        convs += more
        labels += more_labels
    return convs, labels


def make_settings(tmp_path: Path, topics: Topics, **learner: Any) -> WildloopSettings:
    return WildloopSettings(
        data_dir=tmp_path,
        topics=topics,
        learner=small_training(**{"strategy": "natural", "min_pairs": 2, **learner}),
    )


@pytest.fixture
def log(tmp_path: Path, topics: Topics) -> Iterator[EmbeddedEventLog]:
    bus = embedded_log(tmp_path / "events.db")
    bus.ensure_topics(topics.all())
    yield bus
    bus.close()


def service_for(
    settings: WildloopSettings,
    store: Store,
    base_model_dir: Path,
    publisher: EventPublisher | None = None,
    holder: str | None = None,
) -> LearnerService:
    return LearnerService(
        settings,
        LearningStore(store),
        base_model_dir=lambda: base_model_dir,
        metrics=LearnerMetrics(Metrics("learner")),
        publisher=publisher,
        train=train_adapter,
        holder=holder,
    )


@pytest.mark.slow
def test_a_run_turns_stored_feedback_into_a_registered_candidate(
    tmp_path: Path,
    topics: Topics,
    sqlite_store: Store,
    log: EmbeddedEventLog,
    base_model_dir: Path,
    corpus: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    record_corpus(sqlite_store, *corpus)
    settings = make_settings(tmp_path, topics)
    publisher = EventPublisher(log.publisher(), topics)
    service = service_for(settings, sqlite_store, base_model_dir, publisher)

    outcome = service.run_once(max_steps=1, force=True)

    assert outcome.status == "succeeded", outcome.error
    with sqlite_store.transaction() as session:
        adapter = session.get(Adapter, outcome.adapter_id)
        run = session.get(TrainingRun, outcome.run_id)
        pairs = session.scalars(select(PreferencePair).where(PreferencePair.kind == "pair")).all()
    assert adapter is not None and adapter.status == "candidate"
    assert Path(adapter.path, "adapter_model.safetensors").is_file()
    assert adapter.manifest["data_manifest_hash"] == run.data_manifest_hash
    assert run.status == "succeeded" and run.metrics["steps"] == 1
    # 3 natural pairs of the fixture corpus + one per honest conversation; all used by the run.
    assert len(pairs) == 3 + 6
    assert {p.used_by_run_id for p in pairs} == {outcome.run_id}
    assert all(p.checklist for p in pairs)

    sub = log.subscribe([topics.adapter_events], group="check")
    events = [decode(r.value) for r in settle(sub)]
    sub.close()
    assert [(e.adapter_id, e.action) for e in events if isinstance(e, AdapterLifecycleChanged)] == [
        (outcome.adapter_id, AdapterAction.TRAINED),
        (outcome.adapter_id, AdapterAction.CANDIDATE_REGISTERED),
    ]
    text = service.metrics.registry.render().decode()
    assert 'wildloop_learner_runs_total{status="succeeded"} 1.0' in text
    assert "wildloop_learner_train_loss_nats" in text

    # Nothing new: the next run has nothing to train on.
    assert service.run_once(max_steps=1, force=True).status == "skipped"


@pytest.mark.slow
def test_a_failed_run_registers_nothing_and_keeps_its_examples_for_the_next(
    tmp_path: Path,
    topics: Topics,
    sqlite_store: Store,
    base_model_dir: Path,
    corpus: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    record_corpus(sqlite_store, *corpus)
    settings = make_settings(tmp_path, topics, max_loss=1e-6)
    service = service_for(settings, sqlite_store, base_model_dir)

    outcome = service.run_once(max_steps=2, force=True)

    assert outcome.status == "failed"
    assert "loss" in (outcome.error or "")
    with sqlite_store.transaction() as session:
        assert session.scalars(select(Adapter)).all() == []
        run = session.get(TrainingRun, outcome.run_id)
        unused = session.scalars(
            select(PreferencePair).where(PreferencePair.used_by_run_id.is_(None))
        ).all()
    assert run.status == "failed" and "loss" in run.error
    assert len(unused) > 0
    assert not any(p.name.startswith("dpo-") for p in settings.adapters_dir.iterdir())


def test_building_examples_twice_stores_them_once(
    tmp_path: Path,
    topics: Topics,
    store: Store,
    corpus: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    record_corpus(store, *corpus)
    first = service_for(make_settings(tmp_path, topics), store, tmp_path)
    assert first.ingest() > 0
    again = service_for(make_settings(tmp_path, topics), store, tmp_path)  # a restart
    assert again.ingest() == 0
    assert first.ingest() == 0  # nothing labelled since its watermark


def test_only_one_replica_trains_at_a_time(
    tmp_path: Path,
    topics: Topics,
    store: Store,
    corpus: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    record_corpus(store, *corpus)
    settings = make_settings(tmp_path, topics)
    learning = LearningStore(store)
    assert learning.acquire_lease(LEASE, "replica-a", ttl_s=60)

    outcome = service_for(settings, store, tmp_path, holder="replica-b").run_once(force=True)

    assert outcome.status == "busy"
    assert learning.acquire_lease(LEASE, "replica-a", ttl_s=60)  # the holder renews
    assert not learning.acquire_lease(LEASE, "replica-b", ttl_s=60)
    learning.release_lease(LEASE, "replica-a")
    assert learning.acquire_lease(LEASE, "replica-b", ttl_s=60)


def test_a_crashed_holder_s_lease_expires(store: Store) -> None:
    learning = LearningStore(store)
    assert learning.acquire_lease(LEASE, "crashed", ttl_s=0.2)
    assert not learning.acquire_lease(LEASE, "successor", ttl_s=60)
    time.sleep(0.4)
    assert learning.acquire_lease(LEASE, "successor", ttl_s=60)


def test_a_run_is_due_after_enough_new_examples_or_the_interval(
    tmp_path: Path,
    topics: Topics,
    sqlite_store: Store,
    corpus: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    record_corpus(sqlite_store, *corpus)
    settings = make_settings(tmp_path, topics, min_new_pairs=100, interval_minutes=60)
    service = service_for(settings, sqlite_store, tmp_path)
    service.ingest()
    batch = service.batch()
    assert len(batch.pairs) == 9

    assert service.due(batch)  # never trained: the interval has passed
    LearningStore(sqlite_store).start_run(
        run_id="r1", method="dpo", base_model="m", hyperparameters={}
    )
    now = datetime.now(UTC)
    assert not service.due(batch, now=now)  # 9 < 100 and the last run just started
    assert service.due(batch, now=now + timedelta(minutes=61))
    eager = service_for(
        make_settings(tmp_path, topics, min_new_pairs=5, interval_minutes=60),
        sqlite_store,
        tmp_path,
    )
    assert eager.due(batch, now=now)  # 9 >= 5
    strict = service_for(make_settings(tmp_path, topics, min_pairs=20), sqlite_store, tmp_path)
    assert not strict.due(batch, now=now + timedelta(days=1))  # never below min_pairs


def test_learner_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WILDLOOP_LEARNER__METHOD", "kto")
    monkeypatch.setenv("WILDLOOP_LEARNER__MAX_PAIRS_PER_USER", "3")
    settings = WildloopSettings()
    assert settings.learner.method == "kto"
    assert settings.learner.max_pairs_per_user == 3
    assert LearnerSettings().learning_rate == 5e-6


def test_a_run_cut_off_by_a_crash_is_recorded_as_failed_by_the_next_holder(
    tmp_path: Path,
    topics: Topics,
    store: Store,
    corpus: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    record_corpus(store, *corpus)
    learning = LearningStore(store)
    learning.start_run(run_id="crashed", method="dpo", base_model="m", hyperparameters={})

    def broken_train(*_: object, **__: object) -> None:
        raise RuntimeError("out of disk")

    service = service_for(make_settings(tmp_path, topics), store, tmp_path)
    service.train = broken_train  # type: ignore[assignment]
    outcome = service.run_once(force=True)

    assert outcome.status == "failed" and "out of disk" in (outcome.error or "")
    crashed, failed = learning.run("crashed"), learning.run(outcome.run_id or "")
    assert crashed is not None and crashed.status == "failed" and "abandoned" in crashed.error
    assert failed is not None and failed.status == "failed"
    assert learning.acquire_lease(LEASE, "someone-else", ttl_s=60)  # released after the failure
