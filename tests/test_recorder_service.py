"""``wildloop serve recorder`` in production mode: a real Kafka-protocol broker and PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from services.bus.kafka import KafkaEventBus
from services.bus.typed import EventPublisher
from services.events.schemas import FeedbackSubmitted, Rating, Role, TurnLogged
from services.settings import Topics
from services.store.repository import Store
from tests.cli_helpers import WILDLOOP, wildloop_env
from tests.conftest import TEST_KAFKA
from tests.support.net import free_port, wait_for_port
from tests.support.tansu import TansuBroker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def topic_env(topics: Topics) -> dict[str, str]:
    return {f"WILDLOOP_TOPICS__{k.upper()}": v for k, v in topics.model_dump().items()}


def test_recorder_keeps_postgres_in_step_with_kafka_and_exposes_metrics(
    tmp_path: Path, kafka_broker: TansuBroker, pg_url: str, topics: Topics
) -> None:
    port = free_port()
    env = wildloop_env(
        tmp_path,
        WILDLOOP_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        WILDLOOP_DATABASE_URL=pg_url,
        WILDLOOP_METRICS_PORT=str(port),
        WILDLOOP_KAFKA__SESSION_TIMEOUT_MS="6000",
        WILDLOOP_KAFKA__HEARTBEAT_INTERVAL_MS="500",
        **topic_env(topics),
    )
    proc = subprocess.Popen(
        [WILDLOOP, "serve", "recorder"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, timeout_s=60)
        bus = KafkaEventBus([kafka_broker.bootstrap], TEST_KAFKA)
        publisher = EventPublisher(bus.publisher(), topics)
        for i in range(20):
            role = Role.USER if i % 2 == 0 else Role.ASSISTANT
            publisher.publish(
                TurnLogged(conversation_id="c-prod", turn=i, role=role, content=f"m{i}")
            )
        publisher.publish(FeedbackSubmitted(conversation_id="c-prod", turn=1, rating=Rating.UP))
        publisher.close()

        store = Store.open(pg_url.replace("postgresql://", "postgresql+psycopg://"))
        deadline = time.monotonic() + 60
        while store.count_turns() < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.count_turns() == 20
        deadline = time.monotonic() + 10
        while not store.feedback_for("c-prod") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [f.rating for f in store.feedback_for("c-prod")] == ["up"]
        store.close()

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            text = r.read().decode()
        assert (
            f'wildloop_recorder_events_consumed_total{{outcome="applied",'
            f'topic="{topics.chat_turns}"}} 20.0' in text
        )
        assert "wildloop_recorder_event_handling_seconds_count 21.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "recorder stopped: 21 applied" in stderr
