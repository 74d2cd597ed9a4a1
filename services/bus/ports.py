"""The event bus interface both backends (Kafka, embedded log) implement.

Semantics, which the contract tests in ``tests/bus`` check against both backends:

* ``publish`` appends a keyed record; records with the same key land in the same partition and
  are delivered in publish order. A record is durable once ``flush`` has returned without error.
* ``subscribe`` joins a consumer group. Members of a group share the topics' partitions; each
  partition is read by one member at a time.
* Delivery is at least once: ``poll`` returns records after the group's committed position;
  ``commit`` stores the position after every record returned so far. Records returned but not
  committed are delivered again after a crash or a rebalance, so consumers deduplicate (by event
  id) or apply records idempotently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = field(default=())


class BusError(RuntimeError):
    """The bus could not do what was asked."""


class PublishError(BusError):
    """Records could not be made durable (broker down, timeout, rejected)."""


class CommitFailedError(BusError):
    """The group rebalanced: some positions could not be committed and will be redelivered."""


@runtime_checkable
class Publisher(Protocol):
    def publish(
        self, topic: str, *, key: str | None, value: bytes, headers: Headers = ()
    ) -> None: ...

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every published record is durable; raise :class:`PublishError` if not."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Subscription(Protocol):
    group: str

    def poll(self, *, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]: ...

    def commit(self) -> None: ...

    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition) pairs this member reads now."""
        ...

    def lag(self) -> dict[tuple[str, int], int]:
        """Records not yet consumed by this member, per assigned partition."""
        ...

    def close(self) -> None:
        """Leave the group without committing."""
        ...


@runtime_checkable
class EventBus(Protocol):
    def ensure_topics(self, topics: Sequence[str]) -> None: ...

    def publisher(self) -> Publisher: ...

    def subscribe(self, topics: Sequence[str], *, group: str) -> Subscription: ...

    def topics(self) -> dict[str, int]:
        """Existing topics and their partition counts."""
        ...

    def close(self) -> None: ...
