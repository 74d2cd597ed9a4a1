"""The event-loop lag probe: how long work waits before the gateway's loop gets to it."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gateway.loop_lag import LoopLagProbe
from gateway.metrics import LOOP_LAG_BUCKETS

NAME = "lag_seconds"


def histogram() -> tuple[Histogram, CollectorRegistry]:
    registry = CollectorRegistry()
    return Histogram(NAME, "lag", buckets=LOOP_LAG_BUCKETS, registry=registry), registry


def value(registry: CollectorRegistry, suffix: str, **labels: str) -> float:
    return registry.get_sample_value(NAME + suffix, labels) or 0.0


def test_a_blocked_loop_is_recorded_as_late_by_about_the_block() -> None:
    lag, registry = histogram()

    async def scenario() -> None:
        probe = LoopLagProbe(lag, interval_s=0.01)
        probe.start()
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # a callback that holds the loop for 200 ms
        await asyncio.sleep(0.05)
        await probe.stop()

    asyncio.run(scenario())
    count = value(registry, "_count")
    assert count >= 3  # it kept sampling before and after
    late = count - value(registry, "_bucket", le="0.1")
    assert late >= 1  # the sample that spanned the block landed above 100 ms
    assert value(registry, "_sum") >= 0.15


def test_a_stopped_probe_records_nothing_more() -> None:
    lag, registry = histogram()

    async def scenario() -> float:
        probe = LoopLagProbe(lag, interval_s=0.005)
        probe.start()
        await asyncio.sleep(0.05)
        await probe.stop()
        stopped_at = value(registry, "_count")
        await asyncio.sleep(0.05)
        assert value(registry, "_count") == stopped_at
        return stopped_at

    assert asyncio.run(scenario()) >= 1


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoopLagProbe(histogram()[0], interval_s=0)
