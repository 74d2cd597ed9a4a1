"""The consumer runtime survives its store going away and never dead-letters for it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from services.bus.typed import EventPublisher
from services.events.schemas import Role, TurnLogged
from services.metrics import Metrics
from services.recorder import handlers
from services.settings import Topics
from services.store.repository import Store
from services.worker import ConsumerWorker
from tests.conftest import embedded_log
from tests.support.proxy import TcpProxy


@pytest.mark.postgres
def test_a_store_outage_pauses_consumption_and_loses_nothing(
    pg_url: str, tmp_path: Path, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.worker")
    target = urlsplit(pg_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    proxy.start()
    via_proxy = pg_url.replace(f"{target.hostname}:{target.port}", f"127.0.0.1:{proxy.port}")
    store = Store.open(via_proxy.replace("postgresql://", "postgresql+psycopg://"))
    log = embedded_log(tmp_path / "events.db")
    worker = ConsumerWorker(
        subscription=log.subscribe([topics.chat_turns], group="g"),
        store=store,
        handlers=handlers(store),
        dead_letters=EventPublisher(log.publisher(), topics),
        metrics=Metrics("test"),
    )
    publisher = EventPublisher(log.publisher(), topics)

    def publish(first: int, n: int) -> None:
        for i in range(first, first + n):
            role = Role.USER if i % 2 == 0 else Role.ASSISTANT
            publisher.publish(TurnLogged(conversation_id="c", turn=i, role=role, content="x"))
        publisher.flush()

    stop = threading.Event()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(worker.run(stop=stop)))
    thread.start()
    publish(0, 10)
    time.sleep(1.0)
    proxy.stop()  # the store is now unreachable
    publish(10, 10)
    time.sleep(2.0)
    proxy.start()  # and back
    deadline = time.monotonic() + 30
    while store.count_turns() < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    thread.join(30)
    worker.close()
    publisher.close()
    assert store.count_turns() == 20
    stats = result[0]
    assert stats.dead_lettered == 0  # type: ignore[attr-defined]
    assert any(r.getMessage() == "store unavailable, retrying" for r in caplog.records)
    store.close()
    proxy.stop()
