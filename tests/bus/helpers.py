from __future__ import annotations

import time

from services.bus.ports import Record, Subscription


def drain(
    sub: Subscription, want: int, *, timeout_s: float = 30.0, commit: bool = True
) -> list[Record]:
    """Poll until ``want`` records arrived (or the timeout), committing after each poll."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        batch = sub.poll(timeout_s=0.5, max_records=500)
        got.extend(batch)
        if batch and commit:
            sub.commit()
    return got


def settle(sub: Subscription, *, timeout_s: float = 5.0) -> list[Record]:
    """Poll until nothing more arrives for a while; returns what did."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = sub.poll(timeout_s=0.5)
        if not batch and got:
            break
        got.extend(batch)
    return got
