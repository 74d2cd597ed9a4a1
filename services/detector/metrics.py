"""The detector's Prometheus metrics, and the sliding-window SAT/DSAT rates operators alert on."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from services.detector.cascade import CascadeMetrics
from services.events.schemas import DsatRubric, Polarity, SatRubric
from services.metrics import Metrics

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class SlidingRates:
    """Share of SAT-present and DSAT-present labels per (model, adapter) over the last
    ``window_s`` seconds. MIXED counts towards both rates; NEUTRAL towards neither."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._now = clock
        self._events: dict[tuple[str, str], deque[tuple[float, bool, bool]]] = {}
        # Running (SAT, DSAT) counts per key, so reading the rates costs only the expired events.
        self._counts: dict[tuple[str, str], list[int]] = {}

    def add(self, model: str, adapter: str, polarity: Polarity) -> None:
        sat = polarity in (Polarity.SAT, Polarity.MIXED)
        dsat = polarity in (Polarity.DSAT, Polarity.MIXED)
        key = (model, adapter)
        self._events.setdefault(key, deque()).append((self._now(), sat, dsat))
        counts = self._counts.setdefault(key, [0, 0])
        counts[0] += sat
        counts[1] += dsat

    def rates(self) -> dict[tuple[str, str], tuple[float, float, int]]:
        """(model, adapter) -> (SAT rate, DSAT rate, labels in the window)."""
        horizon = self._now() - self.window_s
        result = {}
        for key, events in list(self._events.items()):
            counts = self._counts[key]
            while events and events[0][0] < horizon:
                _, sat, dsat = events.popleft()
                counts[0] -= sat
                counts[1] -= dsat
            if not events:
                del self._events[key]
                del self._counts[key]
                result[key] = (0.0, 0.0, 0)
                continue
            n = len(events)
            result[key] = (counts[0] / n, counts[1] / n, n)
        return result


class DetectorMetrics:
    def __init__(self, metrics: Metrics, *, window_s: float) -> None:
        self.registry = metrics
        self.cascade = CascadeMetrics(metrics)
        self.labels = metrics.counter(
            "labels", "Turn labels emitted, by polarity and tier.", ["polarity", "tier"]
        )
        self.rubrics = metrics.counter(
            "rubrics",
            "Rubrics in emitted labels, by kind (sat/dsat) and rubric.",
            ["kind", "rubric"],
        )
        self.lag = metrics.histogram(
            "label_lag",
            "seconds",
            "From the user turn being logged to its label being emitted.",
            buckets=LAG_BUCKETS,
        )
        self.missing_context = metrics.counter(
            "missing_context_labels", "Labels emitted without the answer they react to."
        )
        self.held = metrics.gauge(
            "held_turns", "turns", "User turns waiting for the answer they react to."
        )
        self.sat_rate = metrics.gauge(
            "sat_rate",
            "ratio",
            "Share of labels with SAT rubrics over the sliding window, per model and adapter.",
            ["model", "adapter"],
        )
        self.dsat_rate = metrics.gauge(
            "dsat_rate",
            "ratio",
            "Share of labels with DSAT rubrics over the sliding window, per model and adapter.",
            ["model", "adapter"],
        )
        self.window_labels = metrics.gauge(
            "window_labels",
            "turns",
            "Labels inside the sliding window behind the rate gauges.",
            ["model", "adapter"],
        )
        self.window = SlidingRates(window_s)

    def observe(
        self,
        *,
        polarity: Polarity,
        tier: str,
        sat: Iterable[SatRubric],
        dsat: Iterable[DsatRubric],
        model: str,
        adapter: str,
        lag_s: float | None,
        missing_context: bool,
    ) -> None:
        self.labels.labels(polarity.value, tier).inc()
        for r in sat:
            self.rubrics.labels("sat", r.value).inc()
        for d in dsat:
            self.rubrics.labels("dsat", d.value).inc()
        if lag_s is not None:
            self.lag.observe(max(lag_s, 0.0))
        if missing_context:
            self.missing_context.inc()
        self.window.add(model, adapter, polarity)

    def export_rates(self) -> None:
        for (model, adapter), (sat, dsat, n) in self.window.rates().items():
            self.sat_rate.labels(model, adapter).set(sat)
            self.dsat_rate.labels(model, adapter).set(dsat)
            self.window_labels.labels(model, adapter).set(n)
