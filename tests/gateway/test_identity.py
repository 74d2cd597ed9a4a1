"""Conversation identity: linking a stateless client's requests by the history it resends.

The behaviour through the API is specified in ``test_api.py``; here the memory itself, in
particular the shared memory that lets several gateway processes (``--workers N``) link a
client whose requests land on different processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.backends.base import ChatMessage
from gateway.identity import ConversationLinker, LocalMemory, SharedMemory

Q1 = [ChatMessage("user", "what is a monad")]


def follow_up(answer: str, question: str) -> list[ChatMessage]:
    return [*Q1, ChatMessage("assistant", answer), ChatMessage("user", question)]


@pytest.fixture(params=["local", "shared"])
def linker(request: pytest.FixtureRequest, tmp_path: Path) -> ConversationLinker:
    if request.param == "local":
        return ConversationLinker(100)
    return ConversationLinker(100, SharedMemory(tmp_path / "conversations.db", 100))


def test_a_resent_history_continues_its_conversation(linker: ConversationLinker) -> None:
    first = linker.resolve("t1", Q1, None)
    linker.remember("t1", Q1, "a burrito", first)
    assert linker.resolve("t1", follow_up("a burrito", "more please"), None) == first
    assert linker.logged_turns(first) == 2


def test_another_tenant_or_another_answer_starts_a_new_conversation(
    linker: ConversationLinker,
) -> None:
    first = linker.resolve("t1", Q1, None)
    linker.remember("t1", Q1, "a burrito", first)
    assert linker.resolve("t2", follow_up("a burrito", "more please"), None) != first
    assert linker.resolve("t1", follow_up("a monoid", "more please"), None) != first


def test_asking_an_answered_turn_again_opens_a_branch(linker: ConversationLinker) -> None:
    first = linker.resolve("t1", Q1, None)
    linker.remember("t1", Q1, "a burrito", first)
    linker.remember("t1", follow_up("a burrito", "more"), "it wraps values", first)
    branch = linker.resolve("t1", Q1, first)  # the first question again, same explicit id
    assert branch.startswith(f"{first}~")


def test_processes_sharing_the_memory_file_link_each_other_s_conversations(
    tmp_path: Path,
) -> None:
    path = tmp_path / "conversations.db"
    worker_1 = ConversationLinker(100, SharedMemory(path, 100))
    worker_2 = ConversationLinker(100, SharedMemory(path, 100))
    first = worker_1.resolve("t1", Q1, None)
    worker_1.remember("t1", Q1, "a burrito", first)
    assert worker_2.resolve("t1", follow_up("a burrito", "more please"), None) == first
    assert worker_2.logged_turns(first) == 2
    # a process-local memory cannot do this: the reason --workers uses the shared one
    alone = ConversationLinker(100, LocalMemory(100))
    assert alone.resolve("t1", follow_up("a burrito", "more please"), None) != first


def test_the_shared_memory_keeps_about_its_capacity(tmp_path: Path) -> None:
    memory = SharedMemory(tmp_path / "conversations.db", capacity=50, prune_every=10)
    for i in range(500):
        memory.remember(f"h{i}", f"c{i}", 2)
    assert memory.conversation_after("h499") == "c499"
    assert memory.conversation_after("h0") is None
    rows = memory._conn.execute("SELECT count(*) FROM history").fetchone()[0]
    assert 50 <= rows <= 60
