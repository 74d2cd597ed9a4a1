"""Metric names follow wildloop_<component>_<what>_<unit>; every service serves /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from services.metrics import Metrics, metric_name


def test_names_are_built_from_component_what_and_a_base_unit() -> None:
    m = Metrics("gateway")
    m.counter("requests", "Requests.", ["status"]).labels("200").inc()
    m.histogram("request_duration", "seconds", "Latency.").observe(0.01)
    m.gauge("outbox_depth", "events", "Depth.").set(3)
    text = m.render().decode()
    assert 'wildloop_gateway_requests_total{status="200"} 1.0' in text
    assert "wildloop_gateway_request_duration_seconds_bucket" in text
    assert "wildloop_gateway_outbox_depth_events 3.0" in text


@pytest.mark.parametrize(
    ("component", "what", "unit"),
    [
        ("Gateway", "x", "seconds"),
        ("gw", "bad-name", "seconds"),
        ("gw", "x", "milliseconds"),
        ("gw", "x", "perc"),
    ],
)
def test_names_outside_the_convention_are_refused(component: str, what: str, unit: str) -> None:
    with pytest.raises(ValueError):
        metric_name(component, what, unit)


def test_each_component_has_its_own_registry() -> None:
    Metrics("a").counter("events", "x")
    Metrics("a").counter("events", "x")  # no clash: no process-wide registry


def test_metrics_are_served_over_http() -> None:
    m = Metrics("recorder")
    m.counter("events_consumed", "x").inc(2)
    server = m.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as r:
            assert "wildloop_recorder_events_consumed_total 2.0" in r.read().decode()
    finally:
        server.close()


# One worker of a multi-process server: it counts requests and sets the shared gauge.
_WORKER = """
import sys
from services.metrics import Metrics
m = Metrics("gateway")
m.counter("requests", "Requests.", ["status"]).labels("200").inc(int(sys.argv[1]))
m.gauge("outbox_depth", "events", "Depth.", multiprocess_mode="mostrecent").set(int(sys.argv[2]))
"""
_RENDER = """
import sys
from services.metrics import Metrics
sys.stdout.write(Metrics("gateway").render().decode())
"""


def test_processes_sharing_a_multiprocess_folder_are_exposed_as_one(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set (``wildloop serve gateway --workers N``), any process
    renders the sum of every process's counters and the latest value of a shared gauge. The
    variable is read when prometheus-client is imported, so each process is a fresh Python."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for requests, depth in ((3, 7), (4, 2)):
        subprocess.run(
            [sys.executable, "-c", _WORKER, str(requests), str(depth)], env=env, check=True
        )
    text = subprocess.run(
        [sys.executable, "-c", _RENDER], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert 'wildloop_gateway_requests_total{status="200"} 7.0' in text
    assert "wildloop_gateway_outbox_depth_events 2.0" in text
