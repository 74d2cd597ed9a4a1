"""The event-bus contract. Every test runs against both backends: the embedded SQLite log and a
real Kafka-protocol broker (Tansu) on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections import defaultdict

from services.bus.ports import CommitFailedError
from services.bus.typed import EventPublisher
from services.events.codec import decode, encode
from services.events.schemas import EventDeadLettered, Role, TurnLogged
from services.metrics import Metrics
from services.recorder import handlers
from services.store.repository import Store
from services.worker import ConsumerWorker
from tests.bus.helpers import drain, settle
from tests.conftest import BusUnderTest


def turn(conversation: str, index: int, text: str = "hello") -> TurnLogged:
    role = Role.USER if index % 2 == 0 else Role.ASSISTANT
    return TurnLogged(conversation_id=conversation, turn=index, role=role, content=text)


def publish_turns(b: BusUnderTest, events: list[TurnLogged]) -> None:
    pub = EventPublisher(b.bus.publisher(), b.settings.topics)
    for e in events:
        pub.publish(e)
    pub.close()


def test_events_with_one_key_stay_in_one_partition_in_publish_order(
    bus_under_test: BusUnderTest, unique: str
) -> None:
    b = bus_under_test
    events = [turn(f"conv-{i % 10}", i // 10) for i in range(300)]  # interleaved keys
    publish_turns(b, events)

    sub = b.bus.subscribe([b.settings.topics.chat_turns], group=f"g-{unique}")
    records = drain(sub, 300)
    sub.close()

    assert len(records) == 300
    partitions: dict[str, set[int]] = defaultdict(set)
    order: dict[str, list[int]] = defaultdict(list)
    for r in records:
        e = decode(r.value)
        assert isinstance(e, TurnLogged) and r.key == e.conversation_id
        partitions[e.conversation_id].add(r.partition)
        order[e.conversation_id].append(e.turn)
    assert all(len(p) == 1 for p in partitions.values())
    assert all(turns == list(range(30)) for turns in order.values())


def test_uncommitted_events_are_redelivered_after_a_consumer_crash(
    bus_under_test: BusUnderTest, unique: str
) -> None:
    b = bus_under_test
    topic, group = b.settings.topics.chat_turns, f"g-{unique}"
    first = [turn(f"c{i}", 0, "first") for i in range(20)]
    second = [turn(f"c{i}", 1, "second") for i in range(20)]

    publish_turns(b, first)
    crashed = b.bus.subscribe([topic], group=group)
    assert len(drain(crashed, 20)) == 20  # consumed and committed
    publish_turns(b, second)
    assert len(drain(crashed, 20, commit=False)) == 20  # consumed, never committed
    crashed.close()  # leaves without committing, as a crash would

    survivor = b.bus.subscribe([topic], group=group)
    redelivered = settle(survivor, timeout_s=20)
    survivor.close()
    assert sorted(decode(r.value).event_id for r in redelivered) == sorted(
        e.event_id for e in second
    )


class Member(threading.Thread):
    """One group member polling in its own thread, as separate processes would."""

    def __init__(self, b: BusUnderTest, topic: str, group: str) -> None:
        super().__init__(daemon=True)
        self.sub = b.bus.subscribe([topic], group=group)
        self.got: list[str] = []
        self.assigned: set[tuple[str, int]] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            batch = self.sub.poll(timeout_s=0.2)
            self.got.extend(decode(r.value).event_id for r in batch)
            # a commit fails when the group rebalanced under this member (services.worker
            # handles it the same way): what it read since goes to the partition's new owner
            with contextlib.suppress(CommitFailedError):
                self.sub.commit()
            self.assigned = self.sub.assignment()
        self.sub.close()


def test_group_members_share_partitions_and_each_event_goes_to_one_member(
    bus_under_test: BusUnderTest, unique: str
) -> None:
    b = bus_under_test
    topic, group = b.settings.topics.chat_turns, f"g-{unique}"
    all_partitions = {(topic, p) for p in range(4)}
    a, c = Member(b, topic, group), Member(b, topic, group)
    a.start()
    c.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the group has settled
        if a.assigned and c.assigned and a.assigned | c.assigned == all_partitions:
            break
        time.sleep(0.1)
    assert a.assigned and c.assigned and not a.assigned & c.assigned
    assert a.assigned | c.assigned == all_partitions

    events = [turn(f"conv-{i}", 0) for i in range(200)]
    publish_turns(b, events)
    deadline = time.monotonic() + 30
    while len(a.got) + len(c.got) < 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    for m in (a, c):
        m.stop.set()
        m.join(timeout=15)
    assert a.got and c.got
    assert not set(a.got) & set(c.got)
    assert sorted(a.got + c.got) == sorted(e.event_id for e in events)


def test_redelivered_and_duplicated_events_are_applied_once(
    bus_under_test: BusUnderTest, unique: str, sqlite_store: Store
) -> None:
    b = bus_under_test
    events = [turn("conv-dup", i) for i in range(10)]
    publish_turns(b, events + events[:5])  # the producer retried five of them

    def worker() -> ConsumerWorker:
        return ConsumerWorker(
            subscription=b.bus.subscribe([b.settings.topics.chat_turns], group=f"g-{unique}"),
            store=sqlite_store,
            handlers=handlers(sqlite_store),
            dead_letters=EventPublisher(b.bus.publisher(), b.settings.topics),
            metrics=Metrics("test"),
        )

    first = worker()
    stats = first.run(max_events=15, idle_timeout_s=20)
    first.close()
    assert (stats.applied, stats.duplicates) == (10, 5)

    # A second member of the same group finds nothing left; a replay from scratch (new
    # group name, same consumer identity in the store) is absorbed by the processed markers.
    assert sqlite_store.count_turns() == 10
    record = sqlite_store.get_conversation("conv-dup")
    assert record is not None and [m.content for m in record.messages] == ["hello"] * 10


def test_malformed_records_are_dead_lettered_with_a_reason_and_never_stop_the_consumer(
    bus_under_test: BusUnderTest, unique: str, sqlite_store: Store
) -> None:
    b = bus_under_test
    t = b.settings.topics
    pub = b.bus.publisher()
    good = turn("conv-ok", 0)
    future = json.loads(encode(turn("conv-x", 0)))
    future["schema_version"] = 99
    bad_values = [
        b"\xff\xfe not utf-8",
        b"{not json",
        json.dumps({"event_type": "nonsense"}).encode(),
        json.dumps(future).encode(),
        json.dumps({"event_type": "turn.logged", "conversation_id": "c", "turn": -1}).encode(),
    ]
    for value in bad_values:
        pub.publish(t.chat_turns, key="conv-bad", value=value)
    pub.publish(t.chat_turns, key=good.conversation_id, value=encode(good))
    pub.close()

    w = ConsumerWorker(
        subscription=b.bus.subscribe([t.chat_turns], group=f"g-{unique}"),
        store=sqlite_store,
        handlers=handlers(sqlite_store),
        dead_letters=EventPublisher(b.bus.publisher(), t),
        metrics=Metrics("test"),
    )
    stats = w.run(max_events=6, idle_timeout_s=20)
    w.close()
    assert (stats.applied, stats.dead_lettered) == (1, 5)
    assert sqlite_store.get_conversation("conv-ok") is not None

    dlq = b.bus.subscribe([t.dead_letter], group=f"dlq-{unique}")
    letters = [decode(r.value) for r in drain(dlq, 5)]
    dlq.close()
    assert all(isinstance(x, EventDeadLettered) for x in letters)
    reasons = sorted(x.reason for x in letters if isinstance(x, EventDeadLettered))
    assert any("not UTF-8" in r for r in reasons)
    assert any("not JSON" in r for r in reasons)
    assert any("unknown event_type 'nonsense'" in r for r in reasons)
    assert any("unsupported schema_version 99" in r for r in reasons)
    assert any("invalid turn.logged" in r for r in reasons)
    raw = {base64.b64decode(x.raw_base64) for x in letters if isinstance(x, EventDeadLettered)}
    assert raw == set(bad_values)


def test_no_event_is_lost_across_a_broker_restart(
    restartable_bus: BusUnderTest, unique: str
) -> None:
    b = restartable_bus
    topic, group = b.settings.topics.chat_turns, f"g-{unique}"
    events = [turn(f"c{i % 7}", i) for i in range(200)]
    publish_turns(b, events)
    sub = b.bus.subscribe([topic], group=group)
    before = drain(sub, 100, commit=False)[:100]
    sub.close()

    b.restart()

    # The group resumes from its committed position (nothing committed: everything), and a
    # fresh group sees every event exactly once.
    for g in (group, f"fresh-{unique}"):
        s = b.bus.subscribe([topic], group=g)
        after = settle(s, timeout_s=30)
        s.close()
        assert sorted(decode(r.value).event_id for r in after) == sorted(e.event_id for e in events)
    assert before
