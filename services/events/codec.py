"""Bytes <-> events. The only place that knows the wire encoding (UTF-8 JSON)."""

from __future__ import annotations

import json

from pydantic import ValidationError

from services.events.schemas import EVENT_TYPES, SCHEMA_VERSION, Event


class DecodeError(ValueError):
    """A record that is not a valid event; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode("utf-8")


def decode(raw: bytes | None) -> Event:
    """Parse one record value into an event or raise :class:`DecodeError`."""
    if raw is None or raw == b"":
        raise DecodeError("empty record value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"value is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"value is not JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"value is a JSON {type(doc).__name__}, not an object")
    event_type = doc.get("event_type")
    if event_type not in EVENT_TYPES:
        raise DecodeError(f"unknown event_type {event_type!r}")
    version = doc.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DecodeError(
            f"unsupported schema_version {version!r} for {event_type} (this consumer reads "
            f"up to {SCHEMA_VERSION})"
        )
    try:
        return EVENT_TYPES[event_type].model_validate(doc)  # type: ignore[return-value]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise DecodeError(
            f"invalid {event_type}: {where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from None
