"""How late the gateway's event loop runs: the queueing that its own timings cannot see.

Every request and every relayed token is a callback on one event loop per worker. When the loop
is busy, a request that has arrived waits in the kernel until the loop gets to it, and the
gateway's own clock (``gateway.timing``) starts only then. ``bench/wire.py`` measured that wait
from the packets on the loopback device: at 32 streams on one core it was most of what the
gateway added (docs/benchmarks.md). In production, the probe below shows it: a task asks to wake
every ``interval_s`` and records how late it woke, in
``wildloop_gateway_event_loop_lag_seconds``. A p99 of a few milliseconds or more means requests
queue behind other requests' work: add workers (``wildloop serve gateway --workers N``, a core
each).

The probe wakes ``1 / interval_s`` times a second (20 at the default): one timer and one
histogram observation each. It samples at times set by its own clock, not by traffic, so busy
and idle moments are sampled alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import Histogram


class LoopLagProbe:
    """Records, every ``interval_s``, how much later than asked the loop woke a sleeping task."""

    def __init__(self, histogram: Histogram, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.histogram = histogram
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            asked = clock()
            await asyncio.sleep(self.interval_s)
            self.histogram.observe(max(0.0, clock() - asked - self.interval_s))
