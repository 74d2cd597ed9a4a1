"""Conversations in the offline format <-> chat-turn events."""

from __future__ import annotations

import hashlib

from services.events.schemas import Role, TurnLogged
from services.formats import ConversationRecord


def import_event_id(conversation_id: str, turn: int, role: str, content: str) -> str:
    """Deterministic id, so importing the same file twice records every turn once."""
    digest = hashlib.sha256(f"{conversation_id}\x00{turn}\x00{role}\x00{content}".encode())
    return "imp-" + digest.hexdigest()[:28]


def turn_events(
    record: ConversationRecord, *, tenant_id: str = "default", model: str | None = None
) -> list[TurnLogged]:
    """One ``TurnLogged`` per message; unknown keys travel in ``extra`` and survive export."""
    events: list[TurnLogged] = []
    for index, message in enumerate(record.messages):
        extra: dict[str, object] = dict(message.extras)
        if index == 0 and record.extras:
            extra["conversation"] = record.extras
        events.append(
            TurnLogged(
                event_id=import_event_id(
                    record.conversation_id, index, message.role, message.content
                ),
                conversation_id=record.conversation_id,
                turn=index,
                role=Role(message.role),
                content=message.content,
                model=model,
                tenant_id=tenant_id,
                extra=extra,
            )
        )
    return events
