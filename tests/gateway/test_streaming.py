"""``gateway.streaming.EventStreamResponse`` under a real uvicorn server: the body is streamed
whole, and a client that hangs up closes the body where it waits, as Starlette's own
``StreamingResponse`` does."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.routing import Route

from gateway.streaming import EventStreamResponse
from tests.support.net import free_port


class Body:
    """Records how each streamed body ended: ``done``, or ``closed`` while waiting."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.event = threading.Event()

    async def stream(self, chunks: int, then_wait: bool) -> AsyncIterator[bytes]:
        try:
            for i in range(chunks):
                yield f"data: {i}\n\n".encode()
            if then_wait:
                await asyncio.sleep(3600)
            self.ended.append("done")
        except (asyncio.CancelledError, GeneratorExit):
            self.ended.append("closed")
            raise
        finally:
            self.event.set()


@pytest.fixture
def server() -> Iterator[tuple[str, Body]]:
    body = Body()

    async def endpoint(request: Request) -> EventStreamResponse:
        wait = request.query_params.get("wait") == "1"
        return EventStreamResponse(
            body.stream(3, then_wait=wait), background=BackgroundTask(body.ended.append, "after")
        )

    app = Starlette(routes=[Route("/stream", endpoint)])
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/stream", body
    srv.should_exit = True
    thread.join(30)


def test_the_whole_body_is_streamed_and_ends(server: tuple[str, Body]) -> None:
    url, body = server
    with httpx.stream("GET", url, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines == ["data: 0", "data: 1", "data: 2"]
    deadline = time.monotonic() + 10
    while body.ended != ["done", "after"]:  # the background task runs after the body
        assert time.monotonic() < deadline, body.ended
        time.sleep(0.01)


def test_a_client_that_hangs_up_closes_the_body_where_it_waits(server: tuple[str, Body]) -> None:
    url, body = server
    with httpx.stream("GET", url, params={"wait": "1"}, timeout=10) as response:
        assert next(response.iter_lines()) == "data: 0"
    assert body.event.wait(10), "the body was not closed after the client left"
    deadline = time.monotonic() + 10
    while body.ended != ["closed", "after"]:  # the handler ended normally: background ran
        assert time.monotonic() < deadline, body.ended
        time.sleep(0.01)
    with httpx.stream("GET", url, timeout=10) as response:  # the server is unharmed
        assert [line for line in response.iter_lines() if line][-1] == "data: 2"
