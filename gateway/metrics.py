"""The gateway's Prometheus metrics, defined in one place."""

from __future__ import annotations

from services.metrics import Metrics

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class GatewayMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.registry = metrics
        self.requests = metrics.counter(
            "requests",
            "HTTP requests, by route, model, adapter and status.",
            ["route", "model", "adapter", "status"],
        )
        self.latency = metrics.histogram(
            "request_duration",
            "seconds",
            "Request latency to the last byte.",
            ["route", "model", "adapter", "status"],
        )
        self.ttft = metrics.histogram(
            "time_to_first_token",
            "seconds",
            "Streaming: time to the first generated text.",
            ["model"],
            buckets=TTFT_BUCKETS,
        )
        self.overhead = metrics.histogram(
            "overhead",
            "seconds",
            "Time a chat request spent in the gateway's own code, not waiting on the backend.",
            ["stream"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.critical_path = metrics.histogram(
            "critical_path",
            "seconds",
            "The gateway's share of a chat request's wait: from the app getting the request "
            "to the backend request going out, plus from the backend's last piece to the answer's "
            "end handed to the server (gateway.timing). Requests the backend answered.",
            ["stream"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.loop_lag = metrics.histogram(
            "event_loop_lag",
            "seconds",
            "How much later than asked the event loop woke a task that sleeps between samples "
            "(gateway.loop_lag): the time a request or a token waits before the gateway starts "
            "on it. A p99 of several ms means the loop is busy: add workers.",
            buckets=LOOP_LAG_BUCKETS,
        )
        self.disconnects = metrics.counter(
            "client_disconnects",
            "Requests whose client went away before the answer was complete, by stream.",
            ["stream"],
        )
        self.tokens = metrics.counter("tokens", "Tokens processed.", ["kind"])
        self.unlogged = metrics.counter(
            "unlogged_answers", "Answers refused because the event backlog was full."
        )
