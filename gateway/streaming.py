"""The SSE response of a streamed chat completion, streamed in the request's own task.

Starlette's ``StreamingResponse``, under a server that speaks ASGI's HTTP spec below 2.4 (uvicorn
reports 2.3), streams the body in a second task of an anyio task group while the request's task
waits for the client to disconnect. That costs ~140-200 us of CPU per streamed response of 17
chunks on the development machine, against ~30-40 us for this class (``bench/routing.py``;
docs/benchmarks.md), on the one event loop that relays every stream's tokens.

This class streams in the request's task and watches for the disconnect in a plain asyncio
task, which cancels the request's task when the client goes away, as the task group's
cancellation did: the body iterator is then closed at the point it was waiting and the handler
ends normally.
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await super().__call__(scope, receive, send)
            return
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone:  # cancelled from elsewhere (shutdown): not ours to absorb
                raise
            task.uncancel()
        finally:
            watcher.cancel()
        if self.background is not None:  # as Starlette runs it: after the body, client gone or not
            await self.background()
