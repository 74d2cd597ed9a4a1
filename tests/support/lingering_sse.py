"""A vLLM-shaped loopback server whose streamed answers end late: it sends the answer's events
and ``data: [DONE]`` at once, then holds the HTTP body open for ``linger_s`` before its end.

vLLM writes ``[DONE]`` and the end of the chunked body separately; this server stretches the gap
between them, so a test can tell whether its client finishes at ``[DONE]`` or at the body's end,
and counts TCP connections, so it can tell whether the client kept its connection.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class LingeringServer:
    url: str  # the OpenAI base URL, .../v1
    model: str
    linger_s: float
    connections: list[int]  # [count], shared with the server's handler threads

    @property
    def connection_count(self) -> int:
        return self.connections[0]


def _events(model: str, text: str) -> bytes:
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**chunk, "choices": [{"index": 0, "delta": {"content": text}}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
    ]
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


@contextmanager
def lingering_sse_server(
    model: str = "m", text: str = "Hi", linger_s: float = 1.5
) -> Iterator[LingeringServer]:
    connections = [0]
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, chunked bodies

        def setup(self) -> None:
            super().setup()
            with lock:
                connections[0] += 1

        def _json(self, value: object) -> None:
            payload = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json({})
            else:  # /v1/models
                card = {"id": model, "object": "model", "root": model, "parent": None}
                self._json({"object": "list", "data": [card]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = _events(model, text)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(events), events))
            self.wfile.flush()
            time.sleep(linger_s)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        yield LingeringServer(url, model, linger_s, connections)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
