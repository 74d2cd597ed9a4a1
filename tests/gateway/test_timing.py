"""The gateway's share of a user's wait: the time before the backend request goes out plus the
time after the backend's last piece comes in."""

from __future__ import annotations

from gateway.timing import RequestTiming


def test_the_critical_path_leaves_out_the_backend_window() -> None:
    timing = RequestTiming(received_at=10.0)
    timing.backend(sent_at=10.002, last_at=12.0)
    critical = timing.critical_s(end=12.003)
    assert critical is not None and abs(critical - 0.005) < 1e-9


def test_a_stream_counts_to_its_closing_events_not_to_its_logging() -> None:
    timing = RequestTiming(received_at=0.0, stream=True)
    timing.backend(sent_at=0.001, last_at=1.0)
    timing.answered_at = 1.001
    # later work (logging the answer) does not count once the closing events went out
    critical = timing.critical_s()
    assert critical is not None and abs(critical - 0.002) < 1e-9


def test_there_is_no_critical_path_until_the_backend_answered() -> None:
    timing = RequestTiming.now()
    assert timing.critical_s() is None
