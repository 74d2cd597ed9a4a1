"""The Kafka backend, through kafka-python. Works with any Kafka-protocol broker.

Records are keyed; kafka-python's default partitioner (murmur2, as Java clients) keeps a key in one
partition. Producers wait for ``acks=all`` and batch with ``linger_ms``; consumers never
auto-commit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError as KafkaCommitFailedError
from kafka.errors import KafkaError, TopicAlreadyExistsError

from services.bus.ports import CommitFailedError, Headers, PublishError, Record
from services.settings import KafkaSettings


class KafkaEventBus:
    """An :class:`~services.bus.ports.EventBus` over a Kafka cluster."""

    def __init__(self, servers: list[str], settings: KafkaSettings) -> None:
        if not servers:
            raise ValueError("no Kafka bootstrap servers configured")
        self.servers = servers
        self.settings = settings

    def _common(self) -> dict[str, Any]:
        s = self.settings
        common: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "client_id": s.client_id,
            "security_protocol": s.security_protocol,
            "request_timeout_ms": s.request_timeout_ms,
            "bootstrap_timeout_ms": s.bootstrap_timeout_ms,
        }
        if s.sasl_mechanism:
            common.update(
                sasl_mechanism=s.sasl_mechanism,
                sasl_plain_username=s.sasl_username,
                sasl_plain_password=s.sasl_password,
            )
        return common

    def _admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(**self._common())

    def ensure_topics(self, topics: Sequence[str]) -> None:
        admin = self._admin()
        try:
            existing = set(admin.list_topics())
            new = [
                NewTopic(
                    name=t,
                    num_partitions=self.settings.partitions,
                    replication_factor=self.settings.replication_factor,
                )
                for t in topics
                if t not in existing
            ]
            if new:
                # Another process may have created one in between.
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(new)
        finally:
            admin.close()

    def topics(self) -> dict[str, int]:
        consumer = KafkaConsumer(**self._common())
        try:
            return {
                t: len(consumer.partitions_for_topic(t) or ()) for t in sorted(consumer.topics())
            }
        finally:
            consumer.close()

    def publisher(self) -> KafkaPublisher:
        return KafkaPublisher(self)

    def subscribe(self, topics: Sequence[str], *, group: str) -> KafkaSubscription:
        return KafkaSubscription(self, list(topics), group)

    def close(self) -> None:
        """Clients are owned by the publishers and subscriptions this bus made."""


class KafkaPublisher:
    def __init__(self, bus: KafkaEventBus) -> None:
        s = bus.settings
        self._producer = KafkaProducer(
            **bus._common(),
            acks=s.acks if s.acks == "all" else int(s.acks),
            linger_ms=s.linger_ms,
            batch_size=s.batch_size,
            max_block_ms=s.max_block_ms,
            retries=5,
        )
        self._failures: list[BaseException] = []
        self._lock = threading.Lock()

    def _on_error(self, exc: BaseException) -> None:
        with self._lock:
            self._failures.append(exc)

    def publish(self, topic: str, *, key: str | None, value: bytes, headers: Headers = ()) -> None:
        try:
            future = self._producer.send(
                topic,
                key=key.encode("utf-8") if key is not None else None,
                value=value,
                headers=list(headers),
            )
        except KafkaError as exc:
            raise PublishError(f"cannot publish to {topic!r}: {exc}") from exc
        future.add_errback(self._on_error)

    def flush(self, timeout_s: float | None = None) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise PublishError(f"flush did not complete: {exc}") from exc
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise PublishError(f"{len(failures)} record(s) failed: {failures[0]!r}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()


class KafkaSubscription:
    def __init__(self, bus: KafkaEventBus, topics: list[str], group: str) -> None:
        s = bus.settings
        self.group = group
        self._consumer = KafkaConsumer(
            *topics,
            **bus._common(),
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
        )

    def poll(self, *, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[Record] = []
        for tp, messages in batches.items():
            for m in messages:
                out.append(
                    Record(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=m.offset,
                        key=m.key.decode("utf-8", "replace") if m.key is not None else None,
                        value=m.value,
                        timestamp_ms=m.timestamp,
                        headers=tuple((k, v or b"") for k, v in (m.headers or ())),
                    )
                )
        return out

    def commit(self) -> None:
        try:
            self._consumer.commit()
        except KafkaCommitFailedError as exc:
            raise CommitFailedError(str(exc)) from exc

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def lag(self) -> dict[tuple[str, int], int]:
        assigned: list[TopicPartition] = list(self._consumer.assignment())
        if not assigned:
            return {}
        # The high watermark the last fetch reported costs no request; ask the broker only for
        # partitions that have not been fetched yet.
        ends: dict[TopicPartition, int] = {}
        unknown: list[TopicPartition] = []
        for tp in assigned:
            hw = self._consumer.highwater(tp)
            if hw is None:
                unknown.append(tp)
            else:
                ends[tp] = hw
        if unknown:
            ends.update(self._consumer.end_offsets(unknown))
        return {
            (tp.topic, tp.partition): max(0, ends[tp] - (self._consumer.position(tp) or 0))
            for tp in assigned
        }

    def close(self) -> None:
        self._consumer.close(autocommit=False)
