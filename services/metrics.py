"""Prometheus metrics with enforced names: ``wildloop_<component>_<what>_<unit>``.

Each service owns one :class:`Metrics` (its own registry, no process-wide globals) and exposes it
on ``/metrics``: long-running workers through :meth:`Metrics.serve`, FastAPI apps by mounting
:meth:`Metrics.asgi_app`.

Several processes serving one port (``wildloop serve gateway --workers N``) use prometheus-client's
multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set before the processes start, every
process writes its values to files in that folder, and :meth:`Metrics.render` adds up the files
of all of them (counters and histograms summed; gauges per their ``multiprocess_mode``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_asgi_app,
    multiprocess,
    start_http_server,
)

_PART = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# Base units only (Prometheus naming practice); counters end in _total.
UNITS = frozenset(
    {
        "seconds",
        "bytes",
        "events",
        "ratio",
        "turns",
        "requests",
        "tokens",
        "records",
        "steps",
        "info",
        "adapters",
        "pairs",
        "items",
        "celsius",
        "nats",  # losses and log-ratio rewards (natural-log units)
        "examples",
    }
)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def metric_name(component: str, what: str, unit: str) -> str:
    for label, part in (("component", component), ("what", what), ("unit", unit)):
        if not _PART.match(part):
            raise ValueError(f"metric {label} {part!r} must be snake_case ([a-z0-9_])")
    if unit not in UNITS and unit != "total":
        raise ValueError(f"unit {unit!r} is not a base unit: use one of {sorted(UNITS)}")
    return f"wildloop_{component}_{what}_{unit}"


class Metrics:
    """The metrics of one component, e.g. ``Metrics("recorder")``."""

    def __init__(self, component: str, registry: CollectorRegistry | None = None) -> None:
        metric_name(component, "x", "total")  # validates the component name
        self.component = component
        self.registry = registry or CollectorRegistry(auto_describe=True)

    def counter(self, what: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A counter exposed as ``wildloop_<component>_<what>_total``."""
        name = metric_name(self.component, what, "total")
        return Counter(name.removesuffix("_total"), doc, list(labels), registry=self.registry)

    def gauge(
        self,
        what: str,
        unit: str,
        doc: str,
        labels: Sequence[str] = (),
        multiprocess_mode: str = "all",
    ) -> Gauge:
        """A gauge; ``multiprocess_mode`` says how processes sharing a port combine it
        (prometheus-client's modes: ``all`` keeps one series per pid, ``mostrecent`` the
        latest value set by any process, ``sum``, ``max``, ...)."""
        return Gauge(
            metric_name(self.component, what, unit),
            doc,
            list(labels),
            registry=self.registry,
            multiprocess_mode=multiprocess_mode,  # type: ignore[arg-type]
        )

    def histogram(
        self,
        what: str,
        unit: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(
            metric_name(self.component, what, unit),
            doc,
            list(labels),
            buckets=list(buckets),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self._exposed())

    def asgi_app(self) -> Any:
        return make_asgi_app(registry=self._exposed())

    def _exposed(self) -> CollectorRegistry:
        """This registry, or in multiprocess mode one that reads the files of all processes."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` over HTTP in a daemon thread; port 0 picks a free port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


class MetricsServer:
    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
