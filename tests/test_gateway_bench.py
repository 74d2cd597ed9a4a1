"""bench/gateway.py's arithmetic: quantiles from the gateway's own histogram buckets."""

from __future__ import annotations

import math

import pytest

from bench.gateway import bucket_quantile

INF = float("inf")


def test_a_quantile_is_interpolated_within_its_bucket_as_prometheus_does() -> None:
    cumulative = {0.001: 50.0, 0.002: 90.0, 0.005: 100.0, INF: 100.0}
    assert bucket_quantile(cumulative, 0.5) == pytest.approx(1.0)  # ms
    assert bucket_quantile(cumulative, 0.99) == pytest.approx(4.7)


def test_a_quantile_in_the_open_top_bucket_is_its_lower_bound() -> None:
    assert bucket_quantile({0.001: 10.0, INF: 20.0}, 0.99) == pytest.approx(1.0)


def test_no_samples_no_quantile() -> None:
    assert math.isnan(bucket_quantile({0.001: 0.0, INF: 0.0}, 0.5))
    assert math.isnan(bucket_quantile({}, 0.5))
