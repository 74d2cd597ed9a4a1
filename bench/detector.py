"""How fast the detector labels turns: per tier, for the cascade, and live through the bus.

1. **Throughput**: turns/s of each tier alone and of the configured cascade (by default rules,
   then the classifier for what the rules are unsure of, then the encoder for what both are),
   judging the turns of the project's dataset that no tier was fitted on (dev and the held-out
   splits; only their texts are read, never their labels) repeated to ``--turns`` turns, in
   batches of ``--batch``, on this machine's CPUs. Train turns would flatter the cascade: the
   classifier is sure of the turns it was trained on, so almost none would reach the encoder
   (2% against 17-20% of unseen turns).
2. **Label lag** while ``--rate`` user turns/s stream through the event bus: a producer logs
   conversations (user turn + answer per step) to the embedded event log at that rate for
   ``--seconds``; ``wildloop serve detector``'s service (the real ``build_detector`` on SQLite)
   labels them; lag = label event time - user turn event time, per turn. p50/p99 and the share
   labelled are printed.

    .venv/bin/python bench/detector.py [--turns 5000] [--rate 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.append(str(Path(__file__).resolve().parent))
from detector_quality import load_split

from services.bus.factory import build_bus
from services.bus.typed import EventPublisher
from services.detector.factory import build_cascade
from services.detector.judgement import TurnContext
from services.detector.metrics import DetectorMetrics
from services.detector.service import build_detector
from services.detector.tiers.encoder import resolve_dtype
from services.events.codec import decode
from services.events.schemas import Role, TurnLabeled, TurnLogged
from services.metrics import Metrics
from services.settings import WildloopSettings
from services.store.repository import Store

console = Console(width=150)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")
    )


def unseen_turns() -> list[TurnContext]:
    """The dataset's turns no tier was fitted on (texts only)."""
    splits = ("dev", "test", "holdout", "holdout2", "holdout3")
    return [c for split in splits for c in load_split(split)[0]]


def throughput(turns: int, batch: int) -> Table:
    base = unseen_turns()
    contexts = [base[i % len(base)] for i in range(turns)]
    cfg = WildloopSettings().detector  # WILDLOOP_DETECTOR__* apply
    arithmetic = resolve_dtype(cfg.encoder_dtype)
    table = Table(
        title=f"detector throughput ({turns} turns, batches of {batch}, encoder in {arithmetic})"
    )
    deciders = ("rules", "classifier", "encoder")
    table.add_column("tier", justify="right")
    for col in ("turns/s", "ms per batch", *(f"decided by {d}" for d in deciders)):
        table.add_column(col, justify="right")
    for name, tiers in (
        ("rules", ["rules"]),
        ("classifier", ["classifier"]),
        ("encoder", ["encoder"]),
        ("cascade", list(cfg.tiers)),
    ):
        cascade = build_cascade(cfg, tiers)
        cascade.judge(contexts[:batch])  # warm-up (model load, first allocation)
        started = time.perf_counter()
        tiers_used: dict[str, int] = {}
        for i in range(0, len(contexts), batch):
            for v in cascade.judge(contexts[i : i + batch]):
                tiers_used[v.tier] = tiers_used.get(v.tier, 0) + 1
        seconds = time.perf_counter() - started
        table.add_row(
            name,
            f"{len(contexts) / seconds:,.0f}",
            f"{seconds / -(-len(contexts) // batch) * 1000:.1f}",
            *(f"{tiers_used.get(d, 0) / len(contexts):.0%}" for d in deciders),
        )
    return table


def live_lag(rate: float, seconds: float) -> Table:
    turns = unseen_turns()
    with tempfile.TemporaryDirectory() as tmp:
        base = WildloopSettings().detector  # WILDLOOP_DETECTOR__* apply
        settings = WildloopSettings(
            data_dir=Path(tmp),
            detector=base.model_copy(update={"missing_context_wait_s": 5.0}),
        )
        log = build_bus(settings)
        log.ensure_topics(settings.topics.all())
        store = Store.open(settings.store_url)
        metrics = Metrics("detector")
        detector_metrics = DetectorMetrics(metrics, window_s=60)
        cascade = build_cascade(settings.detector, metrics=detector_metrics.cascade)
        worker, service = build_detector(
            settings, bus=log, store=store, cascade=cascade, metrics=detector_metrics
        )
        stop = threading.Event()
        thread = threading.Thread(target=lambda: worker.run(stop=stop, poll_timeout_s=0.05))
        thread.start()
        publisher = EventPublisher(log.publisher(), settings.topics)
        sent: dict[tuple[str, int], datetime] = {}
        started = time.perf_counter()
        n = 0
        while time.perf_counter() - started < seconds:
            due = started + n / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            ctx: TurnContext = turns[n % len(turns)]
            conversation = f"bench-{n}"
            answer = TurnLogged(
                conversation_id=conversation,
                turn=1,
                role=Role.ASSISTANT,
                content=ctx.previous_assistant or "",
                model="bench",
            )
            user = TurnLogged(
                conversation_id=conversation,
                turn=2,
                role=Role.USER,
                content=ctx.user,
                model="bench",
            )
            publisher.publish(answer)
            publisher.publish(user)
            publisher.flush()
            sent[conversation, 2] = user.occurred_at
            n += 1
        produced_s = time.perf_counter() - started
        deadline = time.monotonic() + 30
        lags: dict[tuple[str, int], float] = {}
        sub = log.subscribe([settings.topics.labels], group="bench-lag")
        while len(lags) < len(sent) and time.monotonic() < deadline:
            for record in sub.poll(timeout_s=0.5):
                event = decode(record.value)
                if isinstance(event, TurnLabeled):
                    key = (event.conversation_id, event.turn)
                    if key in sent:
                        lags[key] = (event.occurred_at - sent[key]).total_seconds() * 1000
        sub.close()
        stop.set()
        thread.join(30)
        worker.close()
        service.publisher.close()
        publisher.close()
        log.close()
        store.close()
    values = list(lags.values())
    table = Table(title=f"label lag at {rate:.0f} user turns/s for {seconds:.0f} s (embedded log)")
    for col in (
        "user turns sent",
        "achieved turns/s",
        "labelled",
        "lag p50 ms",
        "lag p99 ms",
        "mean",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        str(len(sent)),
        f"{len(sent) / produced_s:.0f}",
        f"{len(values) / len(sent):.1%}",
        f"{pct(values, 0.5):.0f}",
        f"{pct(values, 0.99):.0f}",
        f"{statistics.fmean(values):.0f}" if values else "-",
    )
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=5000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rate", type=float, default=200.0, help="user turns per second")
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · "
        f"{platform.platform()} · Python {platform.python_version()}"
    )
    console.print(throughput(args.turns, args.batch))
    console.print(live_lag(args.rate, args.seconds))


if __name__ == "__main__":
    main()
