"""Chooses the event-bus backend from settings (entrypoints call this, nothing else does)."""

from __future__ import annotations

from services.bus.embedded import EmbeddedEventLog
from services.bus.kafka import KafkaEventBus
from services.bus.ports import EventBus
from services.settings import BusBackend, WildloopSettings


def build_bus(settings: WildloopSettings) -> EventBus:
    if settings.bus_backend is BusBackend.KAFKA:
        return KafkaEventBus(settings.kafka_servers, settings.kafka)
    e = settings.embedded_log
    return EmbeddedEventLog(
        settings.event_log_path,
        partitions=e.partitions,
        poll_interval_s=e.poll_interval_ms / 1000,
        heartbeat_interval_s=e.heartbeat_interval_ms / 1000,
        session_timeout_s=e.session_timeout_ms / 1000,
    )
