"""Benchmark both event-bus backends: the embedded SQLite log and Kafka (a local Tansu broker).

Every event is a real ``TurnLogged`` (300-500 bytes of text, keyed by one of 1,000 conversation
ids) published through ``EventPublisher``, and every consumer is a consumer group member polling
the ``Subscription`` API and committing after each batch. Three measurements per backend:

1. Publish throughput: publish ``--events`` pre-built events, then flush; time from the first
   publish to ``flush()`` returning (encoding is inside the timed loop, building is not).
2. End-to-end latency: a publisher on an absolute schedule (``start + i / rate``, so sleeps do
   not drift) builds each event with ``occurred_at = time.time()``, publishes it and flushes, for
   both backends, so every event is durable before the next one is sent. A consumer thread that
   joined its group before the clock started records ``receive time - occurred_at`` per event.
3. Redelivery after a crash: publish ``--crash-events``; a child process (this file, hidden
   ``_consume`` sub-command) consumes, appends each event id to a file, flushes, then commits;
   the parent SIGKILLs it after about half, then a second member of the same group consumes
   until its lag is zero. Every published event must have been delivered (lost = 0).

The bus configuration is the project's defaults (``KafkaSettings()``, ``EmbeddedLogSettings()``)
except for shorter consumer-group timeouts, so joins and failovers take seconds. Run:
``python bench/bus.py [--events N] [--rate R] [--seconds S] [--crash-events M]
[--backend embedded|kafka|both] [--bootstrap HOST:PORT]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.bus.factory import build_bus
from services.bus.ports import EventBus
from services.bus.typed import EventPublisher
from services.events.codec import decode, encode
from services.events.schemas import Role, TurnLogged
from services.settings import EmbeddedLogSettings, KafkaSettings, Topics, WildloopSettings

ROOT = Path(__file__).resolve().parents[1]
CONVERSATIONS = 1_000
# Project defaults, but group failover in seconds (as tests/conftest.py TEST_KAFKA).
KAFKA = KafkaSettings(
    session_timeout_ms=6000, heartbeat_interval_ms=500, max_poll_interval_ms=10_000
)
EMBEDDED = EmbeddedLogSettings(session_timeout_ms=6000)
TEXT = (
    "Sure - the consumer group rebalances when a member leaves, so uncommitted records are "
    "delivered again. Commit after each batch and deduplicate by event id; that keeps the "
    "projection idempotent. Thanks, that fixed it, but the answer was too long: please give a "
    "shorter version with the code only, and explain why the offset moved backwards. "
) * 4
console = Console()


@dataclass(frozen=True)
class Target:
    """Where a backend lives; a child process rebuilds the bus from these two strings."""

    kind: str  # "embedded" or "kafka"
    where: str  # a data directory or Kafka bootstrap servers

    def open(self) -> EventBus:
        if self.kind == "embedded":
            settings = WildloopSettings(data_dir=Path(self.where), embedded_log=EMBEDDED)
        else:
            settings = WildloopSettings(kafka_bootstrap=self.where, kafka=KAFKA)
        return build_bus(settings)


@dataclass
class Crash:
    published: int = 0
    before_kill: int = 0
    delivered: int = 0
    redelivered: int = 0
    lost: int = 0


@dataclass
class Result:
    backend: str
    publish_eps: float = 0.0
    publish_mbps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    achieved_rate: float = 0.0
    crash: Crash | None = None


def make_turn(rng: random.Random, i: int, occurred_at: datetime | None = None) -> TurnLogged:
    turn = i // CONVERSATIONS
    return TurnLogged(
        conversation_id=f"conv-{i % CONVERSATIONS:05d}",
        turn=turn,
        role=Role.USER if turn % 2 == 0 else Role.ASSISTANT,
        content=TEXT[(j := rng.randrange(300)) : j + rng.randint(300, 500)],
        model="SmolLM2-135M-Instruct",
        user_id=f"user-{i % 97}",
        occurred_at=occurred_at or datetime.now(UTC),
    )


def publisher_for(bus: EventBus, topic: str) -> EventPublisher:
    return EventPublisher(bus.publisher(), Topics(chat_turns=topic))


def measure_throughput(bus: EventBus, topic: str, n: int) -> tuple[float, float]:
    rng = random.Random(1)
    events = [make_turn(rng, i) for i in range(n)]
    size = sum(len(encode(e)) for e in events)
    pub = publisher_for(bus, topic)
    pub.publish(make_turn(rng, 0))  # warm-up: connection and topic metadata, not timed
    pub.flush()
    start = time.perf_counter()
    for event in events:
        pub.publish(event)
    pub.flush()
    elapsed = time.perf_counter() - start
    pub.close()
    return n / elapsed, size / elapsed / 1e6


class LatencyConsumer(threading.Thread):
    """A group member in its own thread; ``ready`` is set once it holds every partition."""

    def __init__(self, target: Target, topic: str, partitions: int) -> None:
        super().__init__(daemon=True)
        self.target, self.topic, self.partitions = target, topic, partitions
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.latencies_ms: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        bus = self.target.open()
        sub = bus.subscribe([self.topic], group=f"latency-{uuid.uuid4().hex[:8]}")
        try:
            while not self.stopping.is_set():
                batch = sub.poll(timeout_s=0.1, max_records=500)
                received = time.time()
                for record in batch:
                    sent = decode(record.value).occurred_at.timestamp()
                    self.latencies_ms.append((received - sent) * 1000)
                if batch:
                    sub.commit()
                if not self.ready.is_set() and len(sub.assignment()) == self.partitions:
                    self.ready.set()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            sub.close()
            bus.close()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


def paced_publish(bus: EventBus, topic: str, rate: float, seconds: float) -> tuple[int, float]:
    """Publish-and-flush ``rate * seconds`` events on an absolute schedule; returns (n, rate)."""
    rng, n = random.Random(2), int(rate * seconds)
    pub = publisher_for(bus, topic)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pub.publish(make_turn(rng, i, datetime.fromtimestamp(time.time(), UTC)))
        pub.flush()
    elapsed = time.perf_counter() - start
    pub.close()
    return n, n / elapsed


def measure_latency(
    target: Target, bus: EventBus, topic: str, rate: float, seconds: float
) -> tuple[list[float], float]:
    consumer = LatencyConsumer(target, topic, bus.topics()[topic])
    consumer.start()
    try:
        wait_for(lambda: consumer.ready.is_set() or not consumer.is_alive(), 60, "group join")
        time.sleep(0.5)  # let the first fetch position settle
        n, achieved = paced_publish(bus, topic, rate, seconds)
        done = lambda: len(consumer.latencies_ms) >= n or not consumer.is_alive()  # noqa: E731
        wait_for(done, 60, "the consumer to catch up")
    finally:
        consumer.stopping.set()
        consumer.join(timeout=30)
    if consumer.error is not None:
        raise RuntimeError("latency consumer failed") from consumer.error
    return sorted(consumer.latencies_ms), achieved


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def crash_consumer(kind: str, where: str, topic: str, group: str, ids_path: str) -> None:
    """The hidden ``_consume`` sub-command: consume forever, recording ids before committing."""
    sub = Target(kind, where).open().subscribe([topic], group=group)
    with open(ids_path, "a", encoding="ascii") as out:
        while True:
            batch = sub.poll(timeout_s=0.5, max_records=500)
            if batch:
                out.write("".join(decode(r.value).event_id + "\n" for r in batch))
                out.flush()
                sub.commit()


def read_ids(path: Path) -> list[str]:
    """Complete lines only: a line cut by the kill was never committed."""
    return [line for line in path.read_text().split("\n") if len(line) == 32]


def consume_until_caught_up(bus: EventBus, topic: str, group: str, timeout_s: float) -> list[str]:
    partitions, got = bus.topics()[topic], []
    sub = bus.subscribe([topic], group=group)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = sub.poll(timeout_s=0.5, max_records=500)
            got.extend(decode(r.value).event_id for r in batch)
            if batch:
                sub.commit()
            elif len(sub.assignment()) == partitions and not any(sub.lag().values()):
                return got
    finally:
        sub.close()
    raise TimeoutError(f"second consumer not caught up after {timeout_s:.0f} s")


def measure_crash(target: Target, bus: EventBus, topic: str, m: int, workdir: Path) -> Crash:
    rng = random.Random(3)
    events = [make_turn(rng, i) for i in range(m)]
    pub = publisher_for(bus, topic)
    for event in events:
        pub.publish(event)
    pub.close()
    group, ids_path = f"crash-{uuid.uuid4().hex[:8]}", workdir / f"{target.kind}-ids.txt"
    ids_path.touch()
    argv = [sys.executable, __file__, "_consume", target.kind, target.where, topic, group]
    child = subprocess.Popen([*argv, str(ids_path)])
    try:
        # Each id line is 33 bytes; stop the child once about half the events are recorded.
        half = lambda: ids_path.stat().st_size >= 33 * (m // 2) or child.poll() is not None  # noqa: E731
        wait_for(half, 180, "the first consumer to reach half")
        if child.poll() is not None:
            raise RuntimeError(f"crash consumer exited early with code {child.returncode}")
    finally:
        child.kill()  # SIGKILL: no commit, no group leave
        child.wait()
    first = read_ids(ids_path)
    counts = Counter(first + consume_until_caught_up(bus, topic, group, timeout_s=180))
    published = {e.event_id for e in events}
    return Crash(
        published=m,
        before_kill=len(first),
        delivered=len(published & counts.keys()),
        redelivered=sum(1 for c in counts.values() if c > 1),
        lost=len(published - counts.keys()),
    )


def run_backend(target: Target, args: argparse.Namespace, workdir: Path) -> Result:
    bus, run = target.open(), uuid.uuid4().hex[:8]
    result = Result(target.kind)
    topics = {p: f"bench-{run}.{p}" for p in ("throughput", "latency", "crash")}
    try:
        bus.ensure_topics(list(topics.values()))
        console.log(f"{target.kind}: publishing {args.events:,} events")
        result.publish_eps, result.publish_mbps = measure_throughput(
            bus, topics["throughput"], args.events
        )
        console.log(f"{target.kind}: {args.rate:,.0f} events/s for {args.seconds:.0f} s")
        lat, result.achieved_rate = measure_latency(
            target, bus, topics["latency"], args.rate, args.seconds
        )
        result.p50_ms, result.p99_ms = percentile(lat, 0.50), percentile(lat, 0.99)
        result.max_ms = lat[-1]
        console.log(f"{target.kind}: crash test with {args.crash_events:,} events")
        result.crash = measure_crash(target, bus, topics["crash"], args.crash_events, workdir)
    finally:
        bus.close()
    return result


def start_local_broker(stack: ExitStack) -> str:
    """A Tansu broker (memory storage) on loopback, stopped when ``stack`` closes."""
    sys.path.insert(0, str(ROOT))  # tests/ is not an installed package
    tansu = importlib.import_module("tests.support.tansu").tansu
    return str(stack.enter_context(tansu()).bootstrap)


def report(results: list[Result]) -> None:
    table = Table(title="wildloop event bus benchmark")
    heads = ["backend", "publish ev/s", "publish MB/s", "e2e p50 ms", "e2e p99 ms"]
    heads += ["e2e max ms", "achieved ev/s", "crash: delivered / redelivered / lost"]
    for head in heads:
        table.add_column(head, justify="left" if head == "backend" else "right")
    for r in results:
        c = r.crash or Crash()
        table.add_row(
            r.backend,
            f"{r.publish_eps:,.0f}",
            f"{r.publish_mbps:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.max_ms:.1f}",
            f"{r.achieved_rate:,.0f}",
            f"{c.delivered:,}/{c.published:,} / {c.redelivered:,} / {c.lost:,}",
        )
    console.print(table)
    by = {r.backend: r for r in results}
    goals = [
        ("kafka", "publish >= 20,000 events/s", lambda r: r.publish_eps >= 20_000),
        ("embedded", "p99 < 50 ms at the fixed rate", lambda r: r.p99_ms < 50),
    ]
    for backend, text, ok in goals:
        if backend in by:
            console.print(f"{backend}: {text}: {'PASS' if ok(by[backend]) else 'FAIL'}")
    for r in results:
        c = r.crash or Crash()
        verdict = "PASS" if c.lost == 0 and c.published else "FAIL"
        console.print(f"{r.backend}: zero lost events ({c.before_kill:,} before kill): {verdict}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=50_000, help="events for the throughput test")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s for the latency test")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of the latency test")
    p.add_argument("--crash-events", type=int, default=20_000, help="events for the crash test")
    p.add_argument("--backend", choices=["embedded", "kafka", "both"], default="both")
    p.add_argument("--bootstrap", help="HOST:PORT of an existing Kafka cluster (default: Tansu)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    if argv[:1] == ["_consume"]:
        crash_consumer(*argv[1:])
        return
    args = parse_args(argv)
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC · {os.cpu_count()} CPUs · "
        f"{platform.platform()} · Python {platform.python_version()}"
    )
    console.print(f"kafka: {KAFKA!r}\nembedded: {EMBEDDED!r}")
    results: list[Result] = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-bus-")))
        if args.backend in ("embedded", "both"):
            results.append(run_backend(Target("embedded", str(workdir / "log")), args, workdir))
        if args.backend in ("kafka", "both"):
            bootstrap = args.bootstrap or start_local_broker(stack)
            results.append(run_backend(Target("kafka", bootstrap), args, workdir))
    report(results)


if __name__ == "__main__":
    main(sys.argv[1:])
