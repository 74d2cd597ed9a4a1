"""Benchmark both event-bus backends: the embedded SQLite log and Kafka (a local Tansu broker).

Every event is a real ``TurnLogged`` (300-500 bytes of text, keyed by one of 1,000 conversation
ids) published through ``EventPublisher``; every consumer is a consumer-group member polling the
``Subscription`` API and committing after each batch. Per backend:

1. Publish throughput: publish ``--events`` pre-built events, then flush; timed from the first
   publish to ``flush()`` returning (encoding is timed, building the events is not).
2. End-to-end latency: a publisher on an absolute schedule (``start + i / rate``: no sleep drift)
   stamps ``occurred_at = time.time()`` into each event and publishes it; a consumer process
   (hidden ``_latency`` sub-command) whose group join finished before the clock started records
   ``receive time - occurred_at``. Embedded: flush after every event (its publisher writes only
   on flush). Kafka: no flush per event (kafka-python cannot flush 1,000 times a second on a
   small machine); ``linger_ms`` sends it, and with ``acks=all`` consumers only see records the
   broker acknowledged, i.e. durable ones.
3. Redelivery after a crash: publish ``--crash-events``; a child process (this file's hidden
   ``_consume`` sub-command) consumes, appends each event id to a file, flushes, then commits;
   it is SIGKILLed as soon as half the ids are in the file. A second member of the same group
   then consumes until its lag is zero. Every published event must arrive (lost = 0).

Settings: the project's defaults with shorter consumer-group timeouts (failover in seconds).
Kafka runs against a Tansu broker started on loopback unless ``--bootstrap`` names a cluster.
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
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

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
ID_LINE = 33  # a hex event id and a newline
# Project defaults, but group failover in seconds (as tests/conftest.py TEST_KAFKA).
KAFKA = KafkaSettings(
    session_timeout_ms=6000, heartbeat_interval_ms=500, max_poll_interval_ms=10_000
)
EMBEDDED = EmbeddedLogSettings(session_timeout_ms=6000)
TEXT = (
    "Sure - a group rebalances when a member leaves, so uncommitted records come again. Commit "
    "after each batch and deduplicate by event id. Thanks, but please give a shorter answer. "
) * 8
console = Console(width=None if sys.stdout.isatty() else 160)


class Target(NamedTuple):
    """Where a backend lives; a child process rebuilds the bus from these two strings."""

    kind: str  # "embedded" or "kafka"
    where: str  # a data directory or Kafka bootstrap servers

    def open(self) -> EventBus:
        if self.kind == "embedded":
            return build_bus(WildloopSettings(data_dir=Path(self.where), embedded_log=EMBEDDED))
        return build_bus(WildloopSettings(kafka_bootstrap=self.where, kafka=KAFKA))


class Crash(NamedTuple):
    published: int
    before_kill: int
    delivered: int
    redelivered: int
    lost: int


class Result(NamedTuple):
    backend: str
    publish: tuple[float, float]  # events/s, MB/s
    latency_ms: tuple[float, float, float]  # p50, p99, max
    achieved_rate: float
    crash: Crash

    def row(self) -> list[str]:
        (eps, mbps), c = self.publish, self.crash
        numbers = [*(f"{x:.1f}" for x in self.latency_ms), f"{self.achieved_rate:,.0f}"]
        crash = [f"{c.delivered:,} of {c.published:,}", f"{c.redelivered:,}", f"{c.lost:,}"]
        return [self.backend, f"{eps:,.0f}", f"{mbps:.1f}", *numbers, *crash]

    def goals(self) -> list[tuple[str, bool]]:
        c = self.crash
        lost = (f"zero lost ({c.before_kill:,} consumed before the kill)", c.lost == 0)
        if self.backend == "kafka":
            return [("publish >= 20,000 events/s", self.publish[0] >= 20_000), lost]
        return [("e2e p99 < 50 ms at the fixed rate", self.latency_ms[1] < 50), lost]


def make_turn(rng: random.Random, i: int, occurred_at: datetime | None = None) -> TurnLogged:
    turn, start = i // CONVERSATIONS, rng.randrange(300)
    return TurnLogged(
        conversation_id=f"conv-{i % CONVERSATIONS:05d}",
        turn=turn,
        role=Role.USER if turn % 2 == 0 else Role.ASSISTANT,
        content=TEXT[start : start + rng.randint(300, 500)],
        model="SmolLM2-135M-Instruct",
        user_id=f"user-{i % 97}",
        occurred_at=occurred_at or datetime.now(UTC),
    )


def publisher_for(bus: EventBus, topic: str) -> EventPublisher:
    return EventPublisher(bus.publisher(), Topics(chat_turns=topic))


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.001)


def publish_all(pub: EventPublisher, events: Sequence[TurnLogged]) -> float:
    """Publish ``events``, then flush; returns the seconds from the first publish to the flush."""
    start = time.perf_counter()
    for event in events:
        pub.publish(event)
    pub.flush()
    return time.perf_counter() - start


def measure_throughput(bus: EventBus, topic: str, n: int) -> tuple[float, float]:
    rng = random.Random(1)
    events = [make_turn(rng, i) for i in range(n + 1)]
    size = sum(len(encode(e)) for e in events[1:])
    pub = publisher_for(bus, topic)
    publish_all(pub, events[:1])  # warm-up (connection, topic metadata), not timed
    elapsed = publish_all(pub, events[1:])
    pub.close()
    return n / elapsed, size / elapsed / 1e6


def spawn(command: str, target: Target, *args: str) -> subprocess.Popen[bytes]:
    """Run one of this file's hidden sub-commands in a child process."""
    return subprocess.Popen([sys.executable, __file__, command, target.kind, target.where, *args])


def latency_consumer(argv: list[str]) -> None:
    """The hidden ``_latency`` sub-command: touches ``ready`` once it holds every partition,
    writes ``n`` latencies (ms) to ``out``; gives up after 60 s without records."""
    kind, where, topic, n, ready, out = argv
    bus = Target(kind, where).open()
    partitions, sub = bus.topics()[topic], bus.subscribe([topic], group=f"latency-{topic}")
    latencies: list[float] = []
    last, joined = time.monotonic(), False
    while len(latencies) < int(n) and time.monotonic() - last < 60:
        batch = sub.poll(timeout_s=0.1, max_records=500)
        received = time.time()
        latencies += [(received - decode(r.value).occurred_at.timestamp()) * 1000 for r in batch]
        if batch:
            sub.commit()
            last = time.monotonic()
        if not joined and len(sub.assignment()) == partitions:
            Path(ready).touch()
            joined = True
    Path(out).write_text("\n".join(f"{x:.3f}" for x in latencies))
    sub.close()


def paced_publish(bus: EventBus, topic: str, rate: float, n: int, flush_each: bool) -> float:
    """Publish ``n`` events on an absolute schedule; returns the achieved rate."""
    rng, pub = random.Random(2), publisher_for(bus, topic)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pub.publish(make_turn(rng, i, datetime.fromtimestamp(time.time(), UTC)))
        if flush_each:
            pub.flush()
    pub.flush()
    elapsed = time.perf_counter() - start
    pub.close()
    return n / elapsed


def measure_latency(
    target: Target, bus: EventBus, topic: str, workdir: Path, *, rate: float, seconds: float
) -> tuple[tuple[float, float, float], float]:
    n, ready, out = int(rate * seconds), workdir / f"{topic}.ready", workdir / f"{topic}.ms"
    child = spawn("_latency", target, topic, str(n), str(ready), str(out))
    try:
        wait_for(lambda: ready.exists() or child.poll() is not None, 60, "the group join")
        time.sleep(0.5)  # let the first fetch positions settle
        achieved = paced_publish(bus, topic, rate, n, flush_each=target.kind == "embedded")
        if child.wait(timeout=60) != 0 or not out.exists():
            raise RuntimeError(f"latency consumer failed with code {child.returncode}")
    finally:
        child.kill()
        child.wait()
    lat = sorted(float(x) for x in out.read_text().split())
    if len(lat) < n:
        raise RuntimeError(f"latency consumer received {len(lat)} of {n} events")
    return (lat[len(lat) // 2], lat[int(0.99 * len(lat))], lat[-1]), achieved


def crash_consumer(argv: list[str]) -> None:
    """The hidden ``_consume`` sub-command: records ids before committing; ends when idle 60 s."""
    kind, where, topic, group, ids_path = argv
    sub = Target(kind, where).open().subscribe([topic], group=group)
    last = time.monotonic()
    with open(ids_path, "a", encoding="ascii") as out:
        while time.monotonic() - last < 60:
            batch = sub.poll(timeout_s=0.5, max_records=500)
            if batch:
                out.write("".join(decode(r.value).event_id + "\n" for r in batch))
                out.flush()
                sub.commit()
                last = time.monotonic()


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


def kill_at_half(target: Target, topic: str, group: str, ids: Path, m: int) -> list[str]:
    """Run the crash consumer until half the ids are recorded, SIGKILL it, return its ids."""
    child = spawn("_consume", target, topic, group, str(ids))
    try:
        half = lambda: ids.stat().st_size >= ID_LINE * (m // 2) or child.poll() is not None  # noqa: E731
        wait_for(half, 180, "the first consumer to reach half")
        if child.poll() is not None:
            raise RuntimeError(f"crash consumer exited early with code {child.returncode}")
    finally:
        child.kill()  # SIGKILL: no commit, no leaving the group
        child.wait()
    # Complete lines only: a line cut by the kill was never committed.
    return [line for line in ids.read_text().split("\n") if len(line) == ID_LINE - 1]


def measure_crash(target: Target, bus: EventBus, topic: str, m: int, workdir: Path) -> Crash:
    rng = random.Random(3)
    published, pub = [make_turn(rng, i) for i in range(m)], publisher_for(bus, topic)
    publish_all(pub, published)
    pub.close()
    group, ids = f"crash-{uuid.uuid4().hex[:8]}", workdir / f"{target.kind}-ids.txt"
    ids.touch()
    first = kill_at_half(target, topic, group, ids, m)
    counts = Counter(first + consume_until_caught_up(bus, topic, group, timeout_s=180))
    wanted = {e.event_id for e in published}
    twice, lost = sum(1 for c in counts.values() if c > 1), len(wanted - counts.keys())
    return Crash(m, len(first), len(wanted & counts.keys()), twice, lost)


def run_backend(target: Target, args: argparse.Namespace, workdir: Path) -> Result:
    bus, run, name = target.open(), uuid.uuid4().hex[:8], target.kind
    topics = {p: f"bench-{run}.{p}" for p in ("throughput", "latency", "crash")}
    try:
        bus.ensure_topics(list(topics.values()))
        console.log(f"{name}: publishing {args.events:,} events")
        publish = measure_throughput(bus, topics["throughput"], args.events)
        console.log(f"{name}: {args.rate:,.0f} events/s for {args.seconds:g} s")
        latency, achieved = measure_latency(
            target, bus, topics["latency"], workdir, rate=args.rate, seconds=args.seconds
        )
        console.log(f"{name}: crash test with {args.crash_events:,} events")
        crash = measure_crash(target, bus, topics["crash"], args.crash_events, workdir)
    finally:
        bus.close()
    return Result(name, publish, latency, achieved, crash)


def start_local_broker(stack: ExitStack) -> str:
    """A Tansu broker (memory storage) on loopback, stopped when ``stack`` closes."""
    sys.path.insert(0, str(ROOT))  # tests/ is not an installed package
    tansu = importlib.import_module("tests.support.tansu").tansu
    return str(stack.enter_context(tansu()).bootstrap)


def report(results: list[Result]) -> None:
    table = Table(title="wildloop event bus benchmark")
    table.add_column("backend")
    for head in ("publish ev/s", "publish MB/s", "e2e p50 ms", "e2e p99 ms", "e2e max ms"):
        table.add_column(head, justify="right")
    for head in ("achieved ev/s", "crash delivered", "crash redelivered", "crash lost"):
        table.add_column(head, justify="right")
    for r in results:
        table.add_row(*r.row())
    console.print(table)
    for r in results:
        for text, ok in r.goals():
            console.print(f"{r.backend}: {text}: {'[green]PASS' if ok else '[red]FAIL'}")


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
    if argv[:1] in (["_consume"], ["_latency"]):
        {"_consume": crash_consumer, "_latency": latency_consumer}[argv[0]](argv[1:])
        return
    args = parse_args(argv)
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · "
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
