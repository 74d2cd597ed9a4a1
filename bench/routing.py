"""The CPU cost of the web framework's share of one streamed chat request, by choice the gateway
made: FastAPI header parameters, and the streaming response class.

Each variant is an ASGI app called in a loop with a null server (``receive`` hands over the
request body; ``send`` discards), so only the framework's own work is timed (``time.process_time``
per call, after a warm-up):

* **route**: the chat route's shape with ``Authorization`` and ``X-Conversation-Id`` as FastAPI
  ``Header()`` parameters (the gateway's before), with the headers read from the request (the
  gateway's now; two dependencies either way), and the typed body alone (the least FastAPI does
  for it); the body is the real ``ChatCompletionRequest`` of a 4-message chat, and every call
  must answer 200 (``tests/test_routing_bench.py``): a route that fails validation is cheap.
* **streaming response**: Starlette's ``StreamingResponse`` (for an ASGI server below HTTP spec
  2.4, as uvicorn: the body streams in an anyio task group beside a disconnect listener) against
  ``gateway.streaming.EventStreamResponse``, each sending 17 chunks (a 16-token answer).

``.venv/bin/python bench/routing.py [--calls 3000] [--rounds 3]``; pin it to one CPU
(``taskset -c 1``) for steadier figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and "gateway" would name
# bench/gateway.py instead of the package; drop the folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse
import asyncio
import json
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated

import uvloop
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import Response
from rich.console import Console
from rich.table import Table
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message

from gateway.protocol import ChatCompletionRequest
from gateway.streaming import EventStreamResponse

PAYLOAD = json.dumps(
    {
        "model": "SmolLM2-135M-Instruct",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there " * 10},
            {"role": "assistant", "content": "hi " * 30},
            {"role": "user", "content": "tell me more [req 1-1]"},
        ],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()
CHUNKS = 17


async def key_from_header(authorization: Annotated[str | None, Header()] = None) -> str:
    return authorization or ""


async def key_from_request(request: Request) -> str:
    return request.headers.get("authorization") or ""


async def service(request: Request) -> int:
    return 1


# Module level: with postponed annotations, FastAPI resolves the dependencies' names in the
# module's globals (a route defined inside a function would fail validation with 422).


async def header_parameters(
    body: ChatCompletionRequest,
    request: Request,
    key: Annotated[str, Depends(key_from_header)],
    svc: Annotated[int, Depends(service)],
    x_conversation_id: Annotated[str | None, Header()] = None,
) -> Response:
    return Response(b"ok")


async def headers_from_request(
    body: ChatCompletionRequest,
    request: Request,
    key: Annotated[str, Depends(key_from_request)],
    svc: Annotated[int, Depends(service)],
) -> Response:
    request.headers.get("x-conversation-id")
    return Response(b"ok")


async def typed_body_only(body: ChatCompletionRequest, request: Request) -> Response:
    return Response(b"ok")


ROUTES = {
    "/header-parameters": header_parameters,
    "/headers-from-request": headers_from_request,
    "/typed-body-only": typed_body_only,
}


def routes() -> FastAPI:
    app = FastAPI()
    for path, endpoint in ROUTES.items():
        app.post(path)(endpoint)
    return app


def scope(path: str) -> dict[str, object]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn reports
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"authorization", b"Bearer key"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(PAYLOAD)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }


async def call(app: ASGIApp, path: str) -> None:
    never = asyncio.Event()
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": PAYLOAD, "more_body": False}
        await never.wait()  # the client stays: a disconnect listener waits here
        return {"type": "http.disconnect"}

    async def send(_: Message) -> None:
        pass

    await app(scope(path), receive, send)  # type: ignore[arg-type]


async def chunks() -> AsyncIterator[bytes]:
    for _ in range(CHUNKS):
        yield b'data: {"choices":[{"delta":{"content":" w"}}]}\n\n'


def streaming(cls: type[StreamingResponse]) -> ASGIApp:
    async def app(scope_: object, receive: object, send: object) -> None:
        await cls(chunks(), media_type="text/event-stream")(scope_, receive, send)  # type: ignore[arg-type]

    return app  # type: ignore[return-value]


async def per_call_us(one: Callable[[], Awaitable[None]], calls: int) -> float:
    for _ in range(200):
        await one()
    started = time.process_time()
    for _ in range(calls):
        await one()
    return (time.process_time() - started) / calls * 1e6


async def measure(calls: int, rounds: int) -> dict[str, list[float]]:
    app = routes()
    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "route: Header() parameters (before)": lambda: call(app, "/header-parameters"),
        "route: headers read from the request (now)": lambda: call(app, "/headers-from-request"),
        "route: typed body only": lambda: call(app, "/typed-body-only"),
        "Starlette StreamingResponse (before)": lambda: call(
            streaming(StreamingResponse), "/stream"
        ),
        "EventStreamResponse (now)": lambda: call(streaming(EventStreamResponse), "/stream"),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, so drift hits every variant alike
        for name, one in variants.items():
            results[name].append(await per_call_us(one, calls))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=3000, help="calls per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results = uvloop.run(measure(args.calls, args.rounds))
    console = Console()
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {platform.platform()} · "
        f"Python {platform.python_version()}"
    )
    table = Table(title=f"CPU per call, us ({args.calls} calls per round)")
    table.add_column("variant")
    for r in range(args.rounds):
        table.add_column(f"round {r + 1}", justify="right")
    for name, values in results.items():
        table.add_row(name, *(f"{v:.1f}" for v in values))
    console.print(table)


if __name__ == "__main__":
    main()
