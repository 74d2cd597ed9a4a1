"""The streaming detector: every eligible user turn of the chat log gets exactly one label.

Runs the real service (``build_detector``) on a real event bus and store with the real rules
tier: the embedded log and SQLite, and once on a Kafka-protocol broker (Tansu) with PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services.bus.embedded import EmbeddedEventLog
from services.bus.kafka import KafkaEventBus
from services.bus.ports import EventBus
from services.bus.typed import EventPublisher
from services.detector.cascade import Cascade, Stage
from services.detector.factory import build_cascade
from services.detector.judgement import TurnContext, Verdict
from services.detector.metrics import DetectorMetrics
from services.detector.service import EXPLICIT_VERSION, build_detector
from services.detector.tiers.rules import RulesTier
from services.events.codec import decode
from services.events.schemas import (
    EventDeadLettered,
    FeedbackSubmitted,
    Polarity,
    Rating,
    Role,
    TurnLabeled,
    TurnLogged,
)
from services.metrics import Metrics
from services.settings import DetectorSettings, Topics, WildloopSettings
from services.store.models import TurnLabel
from services.store.repository import Store
from services.worker import WorkerStats
from tests.bus.helpers import settle
from tests.conftest import TEST_KAFKA, embedded_log
from tests.support.tansu import TansuBroker


class Detector:
    """One detector replica on ``bus``, run in a thread until ``stop()``."""

    def __init__(
        self,
        settings: WildloopSettings,
        bus: EventBus,
        store: Store,
        cascade: Cascade | None = None,
    ) -> None:
        self.metrics = Metrics("detector")
        detector_metrics = DetectorMetrics(self.metrics, window_s=60)
        cascade = cascade or build_cascade(
            settings.detector, ["rules"], metrics=detector_metrics.cascade
        )
        self.worker, self.service = build_detector(
            settings, bus=bus, store=store, cascade=cascade, metrics=detector_metrics
        )
        self._stop = threading.Event()
        self.stats: list[WorkerStats] = []
        self._thread = threading.Thread(
            target=lambda: self.stats.append(self.worker.run(stop=self._stop, poll_timeout_s=0.1))
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.worker.close()
        self.service.publisher.close()


def chat(
    publisher: EventPublisher,
    conversation: str,
    *texts: str,
    first: int = 0,
    first_role: Role = Role.USER,
) -> None:
    """Log alternating user/assistant messages, the one at ``first`` from ``first_role``."""
    other = Role.ASSISTANT if first_role is Role.USER else Role.USER
    for i, text in enumerate(texts, start=first):
        role = first_role if (i - first) % 2 == 0 else other
        publisher.publish(
            TurnLogged(
                conversation_id=conversation,
                turn=i,
                role=role,
                content=text,
                model="m",
                adapter_id="ad-1" if role is Role.ASSISTANT else None,
            )
        )
    publisher.flush()


def labels(store: Store) -> list[TurnLabel]:
    with store.transaction() as session:
        rows = session.scalars(
            select(TurnLabel).order_by(TurnLabel.conversation_id, TurnLabel.turn_index)
        ).all()
        session.expunge_all()
        return list(rows)


def wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def settings(tmp_path: Path, topics: Topics) -> WildloopSettings:
    return WildloopSettings(
        data_dir=tmp_path,
        topics=topics,
        detector=DetectorSettings(tiers=["rules"], missing_context_wait_s=1.0),
    )


@pytest.fixture
def log(settings: WildloopSettings) -> Iterator[EmbeddedEventLog]:
    bus = embedded_log(settings.event_log_path)
    bus.ensure_topics(settings.topics.all())
    yield bus
    bus.close()


@pytest.fixture
def store(settings: WildloopSettings) -> Iterator[Store]:
    store = Store.open(settings.store_url)
    yield store
    store.close()


@pytest.fixture
def publisher(log: EmbeddedEventLog, settings: WildloopSettings) -> Iterator[EventPublisher]:
    pub = EventPublisher(log.publisher(), settings.topics)
    yield pub
    pub.close()


def published_labels(log: EventBus, topics: Topics, timeout_s: float = 3) -> list[TurnLabeled]:
    """Everything on the labels topic (a new consumer group; joining one on Kafka takes a few
    seconds, so give it ``timeout_s``)."""
    sub = log.subscribe([topics.labels], group=f"check-{time.monotonic_ns()}")
    events = [decode(r.value) for r in settle(sub, timeout_s=timeout_s)]
    sub.close()
    return [e for e in events if isinstance(e, TurnLabeled)]


def test_every_user_turn_after_an_answer_gets_one_label_with_the_answer_s_adapter(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    chat(
        publisher,
        "c1",
        "What is the capital of Australia?",
        "The capital of Australia is Sydney.",
        "That's wrong, it's Canberra.",
        "You are right, it is Canberra.",
        "Thank you so much!",
        "You're welcome!",
    )
    detector = Detector(settings, log, store)
    try:
        wait_for(lambda: len(labels(store)) == 2)
    finally:
        detector.stop()

    got = labels(store)
    assert [(lb.turn_index, lb.polarity) for lb in got] == [(2, "DSAT"), (4, "SAT")]
    assert all(lb.adapter_id == "ad-1" and lb.model == "m" for lb in got)
    assert all(lb.detector_version == detector.service.version for lb in got)
    assert "Factual_Error" in got[0].dsat and "Gratitude" in got[1].sat
    sent = published_labels(log, settings.topics)
    assert sorted((e.turn, e.polarity) for e in sent) == [(2, Polarity.DSAT), (4, Polarity.SAT)]


def test_redelivery_and_a_second_run_never_label_a_turn_twice(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    chat(publisher, "c2", "hi", "Hello! How can I help?", "thanks, bye!")
    first = Detector(settings, log, store)
    wait_for(lambda: len(labels(store)) == 1)
    first.stop()
    # The same events once more (a producer retry), and a fresh consumer group re-reading the
    # whole log: the store still holds one label, and re-published labels keep their id.
    chat(publisher, "c2", "hi", "Hello! How can I help?", "thanks, bye!")
    again = settings.model_copy(
        update={"detector": settings.detector.model_copy(update={"consumer_group": "other"})}
    )
    second = Detector(again, log, store)
    time.sleep(2.0)
    second.stop()

    assert len(labels(store)) == 1
    sent = published_labels(log, settings.topics)
    assert len({e.event_id for e in sent}) == 1


def test_a_turn_that_arrives_before_its_answer_waits_for_it(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    slow = settings.model_copy(
        update={"detector": settings.detector.model_copy(update={"missing_context_wait_s": 60})}
    )
    detector = Detector(slow, log, store)
    try:
        chat(publisher, "c3", "What is 2+2?")
        chat(publisher, "c3", "great, thanks!", first=2)  # the user reacts; the answer lags
        time.sleep(1.0)
        assert labels(store) == []
        chat(publisher, "c3", "2+2 is 4.", first=1, first_role=Role.ASSISTANT)
        wait_for(lambda: len(labels(store)) == 1)
    finally:
        detector.stop()

    (label,) = labels(store)
    assert (label.turn_index, label.polarity, label.missing_context) == (2, "SAT", False)


def test_an_answer_that_never_arrives_is_labelled_after_the_wait_with_missing_context(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    chat(publisher, "c4", "this is useless, you never listen", first=4)
    detector = Detector(settings, log, store)
    try:
        wait_for(lambda: len(labels(store)) == 1)
    finally:
        detector.stop()

    (label,) = labels(store)
    assert (label.turn_index, label.polarity, label.missing_context) == (4, "DSAT", True)
    text = detector.metrics.render().decode()
    assert "wildloop_detector_missing_context_labels_total 1.0" in text


def test_explicit_thumbs_are_labelled_and_decide_the_reaction_turn(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    chat(publisher, "c5", "Suggest a cat name.", "How about Whiskers?")
    publisher.publish(
        FeedbackSubmitted(conversation_id="c5", turn=1, rating=Rating.DOWN, comment="boring")
    )
    publisher.flush()
    chat(publisher, "c5", "and a dog name?", first=2)  # a neutral follow-up, on its own
    detector = Detector(settings, log, store)
    try:
        wait_for(lambda: len(labels(store)) == 2)
    finally:
        detector.stop()

    by_version = {lb.detector_version: lb for lb in labels(store)}
    explicit = by_version[EXPLICIT_VERSION]
    assert (explicit.turn_index, explicit.polarity, explicit.tier) == (2, "DSAT", "explicit")
    implicit = by_version[detector.service.version]
    assert implicit.polarity == "DSAT" and implicit.tier.startswith("explicit+")
    assert implicit.confidence == 1.0


def test_opening_turns_and_turns_after_a_system_prompt_get_no_label(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    publisher.publish(
        TurnLogged(conversation_id="c6", turn=0, role=Role.SYSTEM, content="Be nice.")
    )
    chat(publisher, "c6", "thanks in advance!", "Sure.", "perfect, thank you", first=1)
    detector = Detector(settings, log, store)
    try:
        wait_for(lambda: len(labels(store)) == 1)
        time.sleep(1.5)  # past the missing-context wait: turn 1 must still be unlabelled
    finally:
        detector.stop()

    assert [lb.turn_index for lb in labels(store)] == [3]


def test_odd_text_is_labelled_and_bad_records_are_dead_lettered_with_a_reason(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    chat(publisher, "c7", "q", "an answer", "")  # empty reaction
    chat(publisher, "c8", "q", "an answer", "\x00\x01\ufffd" + "é" * 200_000)  # huge, odd
    raw = log.publisher()
    raw.publish(settings.topics.chat_turns, key="c9", value=b"\xff\xfe not json")
    raw.publish(
        settings.topics.chat_turns,
        key="c9",
        value=b'{"event_type": "chat.turn", "schema_version": 1, "role": "robot"}',
    )
    raw.flush()
    detector = Detector(settings, log, store)
    try:
        wait_for(lambda: len(labels(store)) == 2)
    finally:
        detector.stop()

    assert {lb.conversation_id: lb.polarity for lb in labels(store)} == {
        "c7": "NEUTRAL",
        "c8": "NEUTRAL",
    }
    sub = log.subscribe([settings.topics.dead_letter], group="dlq-check")
    dead = [decode(r.value) for r in settle(sub, timeout_s=3)]
    sub.close()
    reasons = [d.reason for d in dead if isinstance(d, EventDeadLettered)]
    assert len(reasons) == 2 and all(r.startswith("undecodable") for r in reasons)


class BrokenOnce:
    """The rules tier, except that its first batch raises (a crashed model, say)."""

    name = "rules"
    version = "1"

    def __init__(self) -> None:
        self.rules = RulesTier()
        self.calls = 0

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("tier crashed")
        return self.rules.judge(contexts)


def test_a_tier_that_fails_loses_no_turn_it_is_judged_again_after_the_wait(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    chat(publisher, "c10", "Is 7 prime?", "Yes, 7 is prime.", "great, thank you!")
    tier = BrokenOnce()
    detector = Detector(settings, log, store, Cascade([Stage(tier, 0.0)]))
    try:
        wait_for(lambda: len(labels(store)) == 1)
    finally:
        detector.stop()

    (label,) = labels(store)
    assert (label.turn_index, label.polarity, label.missing_context) == (2, "SAT", False)
    assert tier.calls >= 2


def test_two_replicas_share_the_work_and_label_each_turn_once(
    settings: WildloopSettings, log: EmbeddedEventLog, store: Store, publisher: EventPublisher
) -> None:
    for n in range(40):
        chat(publisher, f"r{n}", "hello", "Hi there!", "thanks a lot!")
    a = Detector(settings, log, store)
    b = Detector(settings, log, store)
    try:
        wait_for(lambda: len(labels(store)) == 40, timeout_s=40)
    finally:
        a.stop()
        b.stop()

    got = labels(store)
    assert len({(lb.conversation_id, lb.turn_index) for lb in got}) == 40
    text_a, text_b = a.metrics.render().decode(), b.metrics.render().decode()
    assert "wildloop_detector_labels_total" in text_a + text_b
    rate = 'wildloop_detector_sat_rate_ratio{adapter="ad-1",model="m"}'
    assert rate in text_a or rate in text_b


@pytest.mark.kafka
@pytest.mark.postgres
def test_on_kafka_and_postgresql_labels_are_stored_once_and_published(
    kafka_broker: TansuBroker, pg_url: str, tmp_path: Path, topics: Topics
) -> None:
    settings = WildloopSettings(
        data_dir=tmp_path,
        topics=topics,
        kafka_bootstrap=kafka_broker.bootstrap,
        kafka=TEST_KAFKA,
        database_url=pg_url,
        detector=DetectorSettings(tiers=["rules"]),
    )
    bus = KafkaEventBus([kafka_broker.bootstrap], TEST_KAFKA)
    bus.ensure_topics(topics.all())
    store = Store.open(settings.store_url)
    publisher = EventPublisher(bus.publisher(), topics)
    try:
        for n in range(10):
            chat(publisher, f"k{n}", "Translate 'cat' to French.", "Chien.", "wrong, it's chat")
        detector = Detector(settings, bus, store)
        try:
            wait_for(lambda: len(labels(store)) == 10, timeout_s=60)
        finally:
            detector.stop()
        assert {lb.polarity for lb in labels(store)} == {"DSAT"}
        with store.transaction() as session:
            assert session.scalar(select(func.count()).select_from(TurnLabel)) == 10
        assert len(published_labels(bus, topics, timeout_s=30)) == 10
    finally:
        publisher.close()
        bus.close()
        store.close()
