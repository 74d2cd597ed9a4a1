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

The memory is a bounded LRU in the gateway process (:class:`LocalMemory`), or, when several
gateway processes serve one port (``--workers N``), a SQLite file they share
(:class:`SharedMemory`), so a client whose requests land on different workers keeps its
conversation. A client that hops between hosts, or outlives a restart of a single-process
gateway, without sending an id starts a new conversation (send the header to avoid that).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from gateway.backends.base import ChatMessage


def history_hash(tenant_id: str, messages: Sequence[ChatMessage]) -> str:
    doc = json.dumps([tenant_id, [[m.role, m.content] for m in messages]], ensure_ascii=False)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


class ConversationMemory(Protocol):
    """What the linker remembers: history hash -> conversation, conversation -> turns logged."""

    def conversation_after(self, history: str) -> str | None: ...

    def turns_logged(self, conversation_id: str) -> int: ...

    def remember(self, history: str, conversation_id: str, turns: int) -> None: ...


class ConversationLinker:
    """Resolves conversation ids and remembers what was logged (in ``memory``; by default a
    bounded LRU of ``capacity`` conversations in this process)."""

    def __init__(self, capacity: int, memory: ConversationMemory | None = None) -> None:
        self.capacity = capacity
        self.memory = memory if memory is not None else LocalMemory(capacity)

    def resolve(self, tenant_id: str, messages: Sequence[ChatMessage], explicit: str | None) -> str:
        """The conversation id this request continues (a new or branch id if none)."""
        answer_turn = len(messages)
        conversation = explicit or self.memory.conversation_after(
            history_hash(tenant_id, messages[:-1])
        )
        if conversation is None:
            return "c-" + uuid.uuid4().hex
        if self.memory.turns_logged(conversation) > answer_turn:
            # this turn was answered before: a regeneration -> a branch
            return f"{conversation}~{uuid.uuid4().hex[:8]}"
        return conversation

    def logged_turns(self, conversation_id: str) -> int:
        """How many leading turns of the conversation were logged."""
        return self.memory.turns_logged(conversation_id)

    def remember(
        self, tenant_id: str, messages: Sequence[ChatMessage], answer: str, conversation_id: str
    ) -> None:
        """Record that ``messages`` + ``answer`` are logged under ``conversation_id``."""
        if self.capacity == 0:
            return
        after = history_hash(tenant_id, [*messages, ChatMessage("assistant", answer)])
        self.memory.remember(after, conversation_id, len(messages) + 1)


class LocalMemory:
    """Bounded LRUs in this process."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_history: OrderedDict[str, str] = OrderedDict()
        self._logged: OrderedDict[str, int] = OrderedDict()  # conversation -> turns logged
        self._lock = threading.Lock()

    def conversation_after(self, history: str) -> str | None:
        with self._lock:
            return self._by_history.get(history)

    def turns_logged(self, conversation_id: str) -> int:
        with self._lock:
            return self._logged.get(conversation_id, 0)

    def remember(self, history: str, conversation_id: str, turns: int) -> None:
        with self._lock:
            self._put(self._by_history, history, conversation_id)
            self._put(self._logged, conversation_id, turns)

    def _put(self, table: OrderedDict[str, object], key: str, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)


_SHARED_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS history (hash TEXT PRIMARY KEY, conversation TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS logged (conversation TEXT PRIMARY KEY, turns INTEGER NOT NULL)",
)


class SharedMemory:
    """The linker's memory in a SQLite file that the gateway processes of one host share (WAL:
    readers never wait for the writer). Each table keeps about ``capacity`` rows, the most
    recently written ones: ``INSERT OR REPLACE`` gives a written row a new, highest rowid, and
    every ``prune_every`` writes the rows more than ``capacity`` rowids behind are deleted.

    Costs a read or two and one small write transaction per request (tens of microseconds), so
    a single-process gateway keeps :class:`LocalMemory`.
    """

    def __init__(self, path: Path, capacity: int, *, prune_every: int = 1000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.prune_every = prune_every
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=10
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        for statement in _SHARED_SCHEMA:
            self._conn.execute(statement)
        self._writes = 0
        self._lock = threading.Lock()

    def conversation_after(self, history: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT conversation FROM history WHERE hash = ?", (history,)
            ).fetchone()
        return None if row is None else str(row[0])

    def turns_logged(self, conversation_id: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT turns FROM logged WHERE conversation = ?", (conversation_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def remember(self, history: str, conversation_id: str, turns: int) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO history (hash, conversation) VALUES (?, ?)",
                    (history, conversation_id),
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO logged (conversation, turns) VALUES (?, ?)",
                    (conversation_id, turns),
                )
                self._writes += 1
                if self._writes % self.prune_every == 0:
                    for table in ("history", "logged"):
                        self._conn.execute(
                            f"DELETE FROM {table} WHERE rowid <= "  # fixed table names
                            f"(SELECT max(rowid) FROM {table}) - ?",
                            (self.capacity,),
                        )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
