"""How long this machine takes to wake a process that waits on a socket.

Two processes ping-pong one UDP datagram on loopback; the pinger waits ``gap`` between pings, so
the other side (and its CPU, if it has nothing else to do) goes idle between them. The round
trip is two wake-ups plus two loopback sends. Run for the answerer on the pinger's CPU and on
the other CPU, after gaps of 0, 1 and 20 ms: on a virtual machine whose idle vCPUs halt, waking
one costs far more than the send itself, and a proxy pays it for every packet that finds its
CPU idle (``bench/gateway.py --wire --floor`` shows the effect on a whole proxy).

``python bench/wakeup.py [--pings 300]`` needs 2 CPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

GAPS_S = (0.0, 0.001, 0.02)


def answer(sock: socket.socket, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        data, peer = sock.recvfrom(64)
        if data == b"quit":
            return
        sock.sendto(data, peer)


def round_trips_us(answer_cpu: int, gap_s: float, pings: int) -> list[float]:
    """Round-trip times in microseconds, pinger on CPU 0, answerer on ``answer_cpu``."""
    ping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ping.bind(("127.0.0.1", 0))
    pong.bind(("127.0.0.1", 0))
    target = pong.getsockname()
    child = os.fork()
    if child == 0:  # pragma: no cover - the answering process
        ping.close()
        answer(pong, answer_cpu)
        os._exit(0)
    pong.close()
    os.sched_setaffinity(0, {0})
    times: list[float] = []
    try:
        for _ in range(pings):
            if gap_s:
                time.sleep(gap_s)
            sent = time.perf_counter()
            ping.sendto(b"x", target)
            ping.recvfrom(64)
            times.append((time.perf_counter() - sent) * 1e6)
    finally:
        ping.sendto(b"quit", target)
        os.waitpid(child, 0)
        ping.close()
    return sorted(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pings", type=int, default=300, help="round trips per row")
    args = p.parse_args()
    if (os.cpu_count() or 1) < 2:
        p.error("needs at least 2 CPUs")
    console = Console()
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · "
        f"{platform.platform()} · Python {platform.python_version()}"
    )
    table = Table(title="UDP ping-pong on loopback: round trip, microseconds")
    for col in ("answerer", "gap between pings", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="right")
    for cpu, where in ((0, "same CPU"), (1, "other CPU")):
        for gap in GAPS_S:
            t = round_trips_us(cpu, gap, args.pings)
            n = len(t) - 1
            table.add_row(
                where,
                f"{gap * 1000:g} ms",
                *(f"{t[round(q * n)]:.0f}" for q in (0.5, 0.9, 0.99)),
                f"{t[-1]:.0f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
