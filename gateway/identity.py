"""Which conversation a request continues.

1. An explicit id (header ``X-Conversation-Id`` or ``metadata.conversation_id``) wins.
2. Otherwise the gateway links a stateless client's requests by the history it resends: after
   answering, it remembers ``hash(messages + answer) -> conversation``; a later request whose
   prior messages hash to a remembered value continues that conversation.
3. A request for a turn this gateway already answered in that conversation is a
   *regeneration*: it opens a branch (a new conversation id, ``<id>~<suffix>``) instead of
   colliding with the answer on record.

The gateway also remembers how many turns of each conversation it logged, so a request logs only
its new turns (all of them for a conversation it has not seen: event ids are deterministic, so
re-logged turns are deduplicated downstream).

The memory is a bounded LRU per gateway process; a client that hops replicas or outlives a
restart without sending an id starts a new conversation (send the header to avoid that).
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence

from gateway.backends.base import ChatMessage


def history_hash(tenant_id: str, messages: Sequence[ChatMessage]) -> str:
    doc = json.dumps([tenant_id, [[m.role, m.content] for m in messages]], ensure_ascii=False)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


class ConversationLinker:
    """Resolves conversation ids and remembers what this process has logged (bounded LRUs)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_history: OrderedDict[str, str] = OrderedDict()
        self._logged: OrderedDict[str, int] = OrderedDict()  # conversation -> turns logged
        self._lock = threading.Lock()

    def resolve(self, tenant_id: str, messages: Sequence[ChatMessage], explicit: str | None) -> str:
        """The conversation id this request continues (a new or branch id if none)."""
        answer_turn = len(messages)
        with self._lock:
            conversation = explicit or self._by_history.get(history_hash(tenant_id, messages[:-1]))
            if conversation is None:
                return "c-" + uuid.uuid4().hex
            logged = self._logged.get(conversation, 0)
            if logged > answer_turn:  # this turn was answered before: regeneration -> branch
                return f"{conversation}~{uuid.uuid4().hex[:8]}"
            return conversation

    def logged_turns(self, conversation_id: str) -> int:
        """How many leading turns of the conversation this process has logged."""
        with self._lock:
            return self._logged.get(conversation_id, 0)

    def remember(
        self, tenant_id: str, messages: Sequence[ChatMessage], answer: str, conversation_id: str
    ) -> None:
        """Record that ``messages`` + ``answer`` are logged under ``conversation_id``."""
        if self.capacity == 0:
            return
        after = history_hash(tenant_id, [*messages, ChatMessage("assistant", answer)])
        with self._lock:
            self._put(self._by_history, after, conversation_id)
            self._put(self._logged, conversation_id, len(messages) + 1)

    def _put(self, table: OrderedDict[str, object], key: str, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)
