"""The gateway's outbox: the chat path never waits on the broker, and nothing is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.outbox import Outbox, OutboxFullError
from services.bus.embedded import EmbeddedEventLog
from services.bus.kafka import KafkaEventBus
from services.events.codec import decode
from services.events.schemas import Role, TurnLogged
from services.metrics import Metrics
from services.settings import Topics
from tests.bus.helpers import settle
from tests.conftest import TEST_KAFKA, embedded_log
from tests.support.tansu import TansuBroker


def turns(n: int, conversation: str = "c") -> list[TurnLogged]:
    return [
        TurnLogged(
            conversation_id=conversation,
            turn=i,
            role=Role.USER if i % 2 == 0 else Role.ASSISTANT,
            content=f"m{i}",
        )
        for i in range(n)
    ]


def wait_until(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def outbox_to(log: EmbeddedEventLog, tmp_path: Path, topics: Topics, **kw: Any) -> Outbox:
    """An outbox on ``tmp_path/outbox.db`` draining to the embedded ``log``; ``kw`` are
    further ``Outbox`` settings."""
    return Outbox(
        tmp_path / "outbox.db",
        publisher=log.publisher(),
        topics=topics,
        metrics=Metrics("gateway"),
        **kw,
    )


def test_appended_events_reach_the_bus_in_order(tmp_path: Path, topics: Topics) -> None:
    log = embedded_log(tmp_path / "events.db")
    box = outbox_to(log, tmp_path, topics)
    box.start()
    events = turns(30)
    for i in range(0, 30, 3):
        box.append(events[i : i + 3])
    wait_until(lambda: box.depth == 0)
    box.close()
    sub = log.subscribe([topics.chat_turns], group="g")
    got = [decode(r.value) for r in settle(sub)]
    sub.close()
    assert got == events


def test_a_full_outbox_refuses_new_events_and_keeps_what_it_has(
    tmp_path: Path, topics: Topics
) -> None:
    log = embedded_log(tmp_path / "events.db")
    box = outbox_to(log, tmp_path, topics, max_events=100)
    box.append(turns(100))
    with pytest.raises(OutboxFullError, match="backlog full"):
        box.append(turns(1, "other"))
    assert box.depth == 100


def test_a_backlog_left_at_shutdown_is_delivered_by_the_next_start(
    tmp_path: Path, topics: Topics
) -> None:
    log = embedded_log(tmp_path / "events.db")
    first = outbox_to(log, tmp_path, topics)
    first.append(turns(10))  # never started: as if the bus had been down
    second = outbox_to(log, tmp_path, topics)
    assert second.depth == 10
    second.start()
    wait_until(lambda: second.depth == 0)
    second.close()


@pytest.fixture
def s3_broker(s3_env: dict[str, str]) -> Iterator[TansuBroker]:
    broker = TansuBroker("s3://tansu/", env=s3_env)
    broker.start()
    yield broker
    broker.close()


@pytest.mark.kafka
def test_events_appended_while_the_broker_is_down_arrive_once_it_is_back(
    tmp_path: Path, topics: Topics, s3_broker: TansuBroker
) -> None:
    bus = KafkaEventBus([s3_broker.bootstrap], TEST_KAFKA)
    bus.ensure_topics(topics.all())
    metrics = Metrics("gateway")
    box = Outbox(
        tmp_path / "outbox.db",
        publisher=bus.publisher(),
        topics=topics,
        metrics=metrics,
        flush_timeout_s=3,
    )
    box.start()
    box.append(turns(2, "before"))
    wait_until(lambda: box.depth == 0)

    s3_broker.stop()
    events = turns(100, "during")
    started = time.perf_counter()
    for i in range(0, 100, 2):
        box.append(events[i : i + 2])
    appended_s = time.perf_counter() - started
    assert appended_s < 1.0, "the chat path must not wait on the broker"
    wait_until(
        lambda: (
            (metrics.registry.get_sample_value("wildloop_gateway_bus_publish_failures_total") or 0)
            > 0
        )
    )
    assert box.depth == 100

    s3_broker.start()
    wait_until(lambda: box.depth == 0, timeout_s=90)
    box.close()
    sub = bus.subscribe([topics.chat_turns], group="check")
    got = [decode(r.value) for r in settle(sub, timeout_s=30)]
    sub.close()
    ids = {e.event_id for e in got}
    assert {e.event_id for e in events} <= ids  # all arrived (duplicates allowed, by id)


# --- several gateway processes on one outbox file (``--workers N``) -------------------------
# flock locks belong to open file descriptions, so two Outbox objects in one test process
# exclude each other exactly as two worker processes do.


def shared_outboxes(
    tmp_path: Path, topics: Topics, log: EmbeddedEventLog, **kw: Any
) -> tuple[Outbox, Outbox]:
    """Two outboxes on one file, as two worker processes have, quick to poll and elect."""
    fast = {"idle_wait_s": 0.02, "elect_interval_s": 0.05, **kw}
    return outbox_to(log, tmp_path, topics, **fast), outbox_to(log, tmp_path, topics, **fast)


def test_processes_sharing_an_outbox_elect_one_drainer_and_deliver_every_event_once(
    tmp_path: Path, topics: Topics
) -> None:
    log = embedded_log(tmp_path / "events.db")
    a, b = shared_outboxes(tmp_path, topics, log)
    a.start()
    b.start()
    events = turns(40)
    for i in range(0, 40, 2):
        (a if i % 4 == 0 else b).append(events[i : i + 2])
    wait_until(lambda: a.draining != b.draining)
    drainer = a if a.draining else b
    wait_until(lambda: drainer.depth == 0)
    a.close()
    b.close()
    sub = log.subscribe([topics.chat_turns], group="g")
    got = [decode(r.value) for r in settle(sub)]
    sub.close()
    assert sorted(e.event_id for e in got) == sorted(e.event_id for e in events)


def test_when_the_draining_process_stops_another_takes_over(tmp_path: Path, topics: Topics) -> None:
    log = embedded_log(tmp_path / "events.db")
    a, b = shared_outboxes(tmp_path, topics, log)
    a.start()
    wait_until(lambda: a.draining)
    b.start()
    a.close()
    assert not a.draining
    b.append(turns(6, "after"))
    wait_until(lambda: b.draining and b.depth == 0)
    b.close()
    sub = log.subscribe([topics.chat_turns], group="g")
    assert len(settle(sub)) == 6
    sub.close()


def test_the_backlog_bound_counts_the_events_of_every_process(
    tmp_path: Path, topics: Topics
) -> None:
    log = embedded_log(tmp_path / "events.db")
    a, b = shared_outboxes(tmp_path, topics, log, max_events=100)
    a.append(turns(60, "a"))
    b.append(turns(40, "b"))
    assert b.depth == 100
    with pytest.raises(OutboxFullError, match="100 events waiting"):
        a.append(turns(1, "late"))
    a.close(flush_timeout_s=0)
    b.close(flush_timeout_s=0)


def test_a_failed_drainer_election_is_retried_not_fatal(tmp_path: Path, topics: Topics) -> None:
    """The drain thread survives a lock file it cannot open (here: its folder is missing for a
    while) and drains once it can."""
    log = embedded_log(tmp_path / "events.db")
    box = outbox_to(
        log,
        tmp_path,
        topics,
        elect_interval_s=0.05,
        lock_path=tmp_path / "missing" / "outbox.db.drain-lock",
    )
    box.append(turns(4))
    box.start()
    time.sleep(0.3)
    assert not box.draining and box.depth == 4
    (tmp_path / "missing").mkdir()
    wait_until(lambda: box.depth == 0)
    box.close()
