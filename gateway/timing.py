"""The gateway's share of a user's wait on one chat request.

A chat request spends most of its life waiting for the model. What the gateway adds to the wait
a user sees is the time from the app getting the request to the backend request going out
(routing, validation, authentication, conversation linking, building the backend request; not
the wait for a slow client's body) and the time after the backend's last piece comes in
(relaying it, the closing events, handing them to the server). In between, the gateway relays
chunks while the model is still generating: that work overlaps generation and is not on the
user's path unless the gateway falls behind (which shows in time to first token and in
``wildloop_gateway_overhead_seconds``).

``RequestTiming`` carries the four instants through one request, on the ``time.perf_counter()``
clock; ``wildloop_gateway_critical_path_seconds`` is observed from it when the response ends.
Time the request spent queued in the kernel before the event loop read it is not seen here: it
shows only from outside (``bench/gateway.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class RequestTiming:
    # the app got the request, moved on by any time spent waiting for the client's body
    received_at: float
    backend_sent_at: float | None = None  # the backend request went out (or the backend was called)
    backend_last_at: float | None = None  # the backend's last piece came in
    answered_at: float | None = None  # a stream's closing events were handed to the server
    stream: bool = False

    @classmethod
    def now(cls) -> RequestTiming:
        return cls(time.perf_counter())

    def backend(self, sent_at: float, last_at: float) -> None:
        """Record the backend's window (a request that reached the backend and got its answer)."""
        self.backend_sent_at, self.backend_last_at = sent_at, last_at

    def critical_s(self, end: float | None = None) -> float | None:
        """Seconds of the gateway on the user's path, up to ``end`` (default: the stream's end,
        else now); None until the backend answered."""
        if self.backend_sent_at is None or self.backend_last_at is None:
            return None
        if end is None:
            end = self.answered_at if self.answered_at is not None else time.perf_counter()
        return (self.backend_sent_at - self.received_at) + (end - self.backend_last_at)
