"""Run the real gateway app under uvicorn on loopback in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from gateway.app import create_app
from gateway.backends.base import ChatBackend
from services.settings import WildloopSettings


@contextmanager
def running_gateway(
    settings: WildloopSettings, backend: ChatBackend | None = None
) -> Iterator[str]:
    """Yield the gateway's base URL (``http://127.0.0.1:PORT``) while it serves."""
    app = create_app(settings, backend=backend)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.gateway.port, log_config=None, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.gateway.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
