"""The consumer runtime every wildloop worker shares.

``ConsumerWorker`` turns a subscription into calls of plain handler functions:

* each record is decoded into an event; a record that is not a valid event, or that a handler
  rejects, goes to the dead-letter topic with its reason and never stops the worker;
* each event is applied in one store transaction together with a ``processed_events`` marker for
  (group, event id), so a redelivered event is skipped: the effect happens exactly once;
* positions are committed after each batch has been applied; a crash before that redelivers the
  batch, which the markers then absorb;
* a store that is down (``OperationalError``) is retried with backoff, never dead-lettered.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.bus.ports import CommitFailedError, Record, Subscription
from services.bus.typed import EventPublisher
from services.events.codec import DecodeError, decode
from services.events.schemas import Event, EventDeadLettered
from services.metrics import Metrics
from services.store.repository import Store

log = logging.getLogger(__name__)

Handler = Callable[[Any, Session], None]


class RejectedEventError(Exception):
    """Raised by a handler for an event that can never be applied (goes to dead letters)."""


@dataclass
class WorkerStats:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    reasons: list[str] = field(default_factory=list)


class WorkerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.events = metrics.counter(
            "events_consumed", "Events consumed, by topic and outcome.", ["topic", "outcome"]
        )
        self.dead_letters = metrics.counter(
            "dead_letters", "Records sent to the dead-letter topic, by kind.", ["kind"]
        )
        self.handle_seconds = metrics.histogram(
            "event_handling", "seconds", "Time to apply one event, store commit included."
        )
        self.lag = metrics.gauge(
            "consumer_lag", "records", "Records not yet consumed.", ["topic", "partition"]
        )
        self.commit_failures = metrics.counter(
            "commit_failures", "Commits refused because the group rebalanced."
        )


class ConsumerWorker:
    def __init__(
        self,
        *,
        subscription: Subscription,
        store: Store,
        handlers: Mapping[type[Any], Handler],
        dead_letters: EventPublisher,
        metrics: Metrics,
        max_attempts: int = 3,
        batch_size: int = 500,
        lag_interval_s: float = 5.0,
        before_batch: Callable[[list[Event]], None] | None = None,
        after_batch: Callable[[], None] | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """``before_batch`` sees every decodable event of a polled batch before any is applied
        (to do batch work, such as judging many turns at once); ``after_batch`` runs after
        they are applied and before their positions are committed (to flush what the handlers
        published); ``tick`` runs once per loop, polled records or not (timers)."""
        self.subscription = subscription
        self.group = subscription.group
        self.store = store
        self.handlers = dict(handlers)
        self.dead_letters = dead_letters
        self.metrics = WorkerMetrics(metrics)
        self.max_attempts = max_attempts
        self.batch_size = batch_size
        self.lag_interval_s = lag_interval_s
        self._next_lag = 0.0
        self.before_batch = before_batch
        self.after_batch = after_batch
        self.tick = tick

    def close(self) -> None:
        """Leave the group (uncommitted records go to another member) and flush dead letters."""
        try:
            self.subscription.close()
        finally:
            self.dead_letters.close()

    # -- the loop ---------------------------------------------------------------------------------
    def run(
        self,
        *,
        stop: threading.Event | None = None,
        max_events: int | None = None,
        idle_timeout_s: float | None = None,
        poll_timeout_s: float = 0.5,
    ) -> WorkerStats:
        """Consume until ``stop`` is set, ``max_events`` were handled, or nothing arrived for
        ``idle_timeout_s`` seconds."""
        stats = WorkerStats()
        idle_since = time.monotonic()
        while not (stop and stop.is_set()):
            records = self.subscription.poll(timeout_s=poll_timeout_s, max_records=self.batch_size)
            if self.tick is not None:
                self.tick()
            if records:
                self.process(records, stats)
                idle_since = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                break
            self._export_lag()
            handled = stats.applied + stats.duplicates + stats.dead_lettered
            if max_events is not None and handled >= max_events:
                break
        return stats

    def process(self, records: list[Record], stats: WorkerStats) -> None:
        """Apply one polled batch, then commit its positions."""
        dead: list[EventDeadLettered] = []
        decoded: list[Event | DecodeError] = []
        for record in records:
            try:
                decoded.append(decode(record.value))
            except DecodeError as exc:
                decoded.append(exc)
        if self.before_batch is not None:
            self.before_batch([e for e in decoded if not isinstance(e, DecodeError)])
        for record, event in zip(records, decoded, strict=True):
            outcome = self._apply_with_retry(record, event, dead)
            self.metrics.events.labels(record.topic, outcome).inc()
            if outcome == "applied":
                stats.applied += 1
            elif outcome == "duplicate":
                stats.duplicates += 1
        if dead:
            for event in dead:
                self.dead_letters.publish(event)
            # Must be durable before the positions move past the records.
            self.dead_letters.flush()
            stats.dead_lettered += len(dead)
            stats.reasons.extend(e.reason for e in dead)
        if self.after_batch is not None:
            self.after_batch()
        try:
            self.subscription.commit()
        except CommitFailedError as exc:
            self.metrics.commit_failures.inc()
            log.warning("commit refused", extra={"group": self.group, "error": str(exc)})
        stats.batches += 1

    def _apply_with_retry(
        self, record: Record, event: Event | DecodeError, dead: list[EventDeadLettered]
    ) -> str:
        if isinstance(event, DecodeError):
            dead.append(self._dead_letter(record, f"undecodable: {event.reason}", "undecodable"))
            return "dead_lettered"
        handler = self._handler_for(event)
        if handler is None:
            reason = f"no handler for {event.event_type} in group {self.group!r}"
            dead.append(self._dead_letter(record, reason, "unhandled"))
            return "dead_lettered"
        attempt = 0
        backoff = 0.05
        while True:
            attempt += 1
            try:
                with self.metrics.handle_seconds.time():
                    return self._apply(event, handler)
            except RejectedEventError as exc:
                dead.append(self._dead_letter(record, f"rejected: {exc}", "rejected"))
                return "dead_lettered"
            except OperationalError as exc:
                # The store is unreachable or locked: wait, never drop the event.
                log.warning(
                    "store unavailable, retrying",
                    extra={"group": self.group, "error": str(exc.orig), "attempt": attempt},
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:
                if attempt >= self.max_attempts:
                    log.exception("handler failed", extra={"group": self.group})
                    reason = f"handler failed {attempt} times: {type(exc).__name__}: {exc}"
                    dead.append(self._dead_letter(record, reason, "handler_error"))
                    return "dead_lettered"
                time.sleep(backoff)

    def _apply(self, event: Event, handler: Handler) -> str:
        with self.store.transaction() as session:
            if not self.store.mark_processed(session, consumer=self.group, event_id=event.event_id):
                return "duplicate"
            handler(event, session)
        return "applied"

    def _handler_for(self, event: Event) -> Handler | None:
        for cls in type(event).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None

    def _dead_letter(self, record: Record, reason: str, kind: str) -> EventDeadLettered:
        self.metrics.dead_letters.labels(kind).inc()
        log.warning(
            "dead-lettering record",
            extra={
                "group": self.group,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "reason": reason,
            },
        )
        # A deterministic id: redelivering the same bad record dead-letters it under the same id.
        ident = f"{self.group}/{record.topic}/{record.partition}/{record.offset}"
        return EventDeadLettered(
            event_id=hashlib.sha256(ident.encode()).hexdigest()[:32],
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            source_key=record.key,
            consumer_group=self.group,
            reason=reason,
            raw_base64=base64.b64encode(record.value or b"").decode("ascii"),
        )

    def _export_lag(self) -> None:
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + self.lag_interval_s
        try:
            for (topic, partition), lag in self.subscription.lag().items():
                self.metrics.lag.labels(topic, str(partition)).set(lag)
        except Exception as exc:  # lag is informative; never stop consuming for it
            log.debug("lag unavailable", extra={"error": str(exc)})
