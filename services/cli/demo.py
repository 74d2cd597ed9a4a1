"""``wildloop demo``: a real round trip through the event log into the store and back out."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from services.bus.ports import EventBus
from services.bus.typed import EventPublisher
from services.cli.context import context, err, fail, out
from services.conversations import turn_events
from services.formats import ConversationRecord, LineError, read_jsonl, write_jsonl_atomic
from services.metrics import Metrics
from services.recorder import build_recorder
from services.settings import WildloopSettings
from services.store.repository import Store


def demo(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option(help="Where to export the store afterwards (default: DATA_DIR/export.jsonl)."),
    ] = None,
) -> None:
    """Publish the bundled demo conversations as chat-turn events, record them into the store
    with the recorder, label every user turn with the SAT/DSAT detector (the configured
    cascade), and export the store as JSON Lines."""
    cli = context(ctx)
    settings = cli.settings
    source = resources.files("services") / "data" / "demo_conversations.jsonl"
    with source.open(encoding="utf-8") as stream:
        records = [
            r for _, r in read_jsonl(stream, ConversationRecord) if not isinstance(r, LineError)
        ]

    store = cli.open_store()
    bus = cli.open_bus()
    bus.ensure_topics(settings.topics.all())
    started = time.perf_counter()
    publisher = EventPublisher(bus.publisher(), settings.topics)
    events = [e for r in records for e in turn_events(r, tenant_id="demo")]
    for event in events:
        publisher.publish(event)
    publisher.close()
    published = time.perf_counter()

    worker = build_recorder(settings, bus=bus, store=store, metrics=Metrics("recorder"))
    try:
        stats = worker.run(idle_timeout_s=2.0)
    finally:
        worker.close()
    recorded = time.perf_counter()
    _detect(settings, bus, store)
    detected = time.perf_counter()

    target = output or settings.data_dir / "export.jsonl"
    count = write_jsonl_atomic(
        target, (r.model_dump(mode="json") for r in store.iter_conversations(tenant_id="demo"))
    )
    rows = store.list_conversations(tenant_id="demo", limit=100)
    polarities = store.label_polarities(tenant_id="demo")
    labelled = sum(len(found) for found in polarities.values())
    bus.close()
    store.close()

    table = Table(title=f"wildloop demo ({settings.mode} mode, {settings.bus_backend.value} bus)")
    for col in ("conversation", "turns", "labels (turn: polarity)"):
        table.add_column(col)
    for r in rows:
        found = polarities.get(r.conversation_id, [])
        table.add_row(r.conversation_id, str(r.turns), ", ".join(f"{t}: {p}" for t, p in found))
    out.print(table)
    err.print(
        f"published {len(events)} turn events in {(published - started) * 1000:.0f} ms; "
        f"recorder applied {stats.applied}, skipped {stats.duplicates} already-recorded, "
        f"dead-lettered {stats.dead_lettered} in {(recorded - published) * 1000:.0f} ms "
        f"(incl. 2 s idle wait)\n"
        f"detector labelled {labelled} user turn(s) in {(detected - recorded) * 1000:.0f} ms "
        f"(incl. 2 s idle wait)\n"
        f"store: {settings.store_url}\nexported {count} conversation(s) to {target}",
        highlight=False,
    )
    if stats.dead_lettered:
        raise typer.Exit(1)


def _detect(settings: WildloopSettings, bus: EventBus, store: Store) -> None:
    """Run the streaming detector over the log until it is idle (it writes the labels)."""
    from services.detector.factory import DetectorConfigError  # noqa: PLC0415
    from services.detector.service import open_detector  # noqa: PLC0415

    try:
        worker, service = open_detector(settings, bus=bus, store=store, metrics=Metrics("detector"))
    except DetectorConfigError as exc:
        fail(str(exc), code=2)
    try:
        worker.run(idle_timeout_s=2.0)
    finally:
        worker.close()
        service.close()
