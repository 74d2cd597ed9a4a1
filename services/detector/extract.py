"""Conversations -> the user turns the detector judges (FORMATS.md: every user message that
follows at least one assistant message gets exactly one label)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from services.detector.judgement import Message, TurnContext
from services.formats import ConversationRecord

DEFAULT_HISTORY_MESSAGES = 4


def turn_contexts(
    conversation_id: str,
    messages: Sequence[Message],
    *,
    history_messages: int = DEFAULT_HISTORY_MESSAGES,
) -> Iterator[TurnContext]:
    """One context per eligible user turn, in order.

    ``previous_assistant`` is the nearest assistant message before the turn; ``history`` holds
    up to ``history_messages`` messages before that answer (system message excluded).
    """
    last_assistant: int | None = None
    for i, message in enumerate(messages):
        if message.role == "assistant":
            last_assistant = i
        elif message.role == "user" and last_assistant is not None:
            start = max(0, last_assistant - history_messages)
            history = tuple(m for m in messages[start:last_assistant] if m.role != "system")
            yield TurnContext(
                conversation_id=conversation_id,
                turn=i,
                user=message.content,
                previous_assistant=messages[last_assistant].content,
                history=history,
            )


def record_contexts(
    record: ConversationRecord, *, history_messages: int = DEFAULT_HISTORY_MESSAGES
) -> list[TurnContext]:
    messages = [Message(m.role, m.content) for m in record.messages]
    return list(turn_contexts(record.conversation_id, messages, history_messages=history_messages))
