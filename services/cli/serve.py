"""``wildloop serve``: long-running services."""

from __future__ import annotations

import logging
import signal
import threading
from importlib.metadata import entry_points
from typing import Annotated

import typer

from services.cli.context import context, err, fail
from services.metrics import Metrics
from services.recorder import build_recorder

app = typer.Typer(help="Run a long-running wildloop service.", no_args_is_help=True)
log = logging.getLogger("wildloop.serve")

PLUGIN_GROUP = "wildloop.serve"


def register_plugins() -> None:
    """Add ``wildloop serve <name>`` for every installed component that declares an entry point
    in the ``wildloop.serve`` group (e.g. the gateway). The core CLI never imports components;
    they plug themselves in, so dependencies keep pointing inward."""
    for ep in entry_points(group=PLUGIN_GROUP):
        app.command(ep.name)(ep.load())


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


@app.command("recorder")
def recorder(
    ctx: typer.Context,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of /metrics (default: WILDLOOP_METRICS_PORT).")
    ] = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit after this many seconds without new events (batch use)."),
    ] = None,
) -> None:
    """Keep the store in step with the event log (turns, feedback, labels, adapter events)."""
    cli = context(ctx)
    settings = cli.settings
    store = cli.open_store()
    bus = cli.open_bus()
    metrics = Metrics("recorder")
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = metrics.serve(settings.metrics_host, port)
    worker = build_recorder(settings, bus=bus, store=store, metrics=metrics)
    stop = _stop_on_signals()
    log.info(
        "recorder started",
        extra={"bus": settings.bus_backend.value, "metrics_port": server.port},
    )
    try:
        stats = worker.run(stop=stop, idle_timeout_s=idle_exit)
    finally:
        worker.close()
        server.close()
        bus.close()
        store.close()
    err.print(
        f"recorder stopped: {stats.applied} applied, {stats.duplicates} duplicate(s), "
        f"{stats.dead_lettered} dead-lettered",
        highlight=False,
    )


@app.command("detector")
def detector(
    ctx: typer.Context,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of /metrics (default: WILDLOOP_METRICS_PORT).")
    ] = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit after this many seconds without new events (batch use)."),
    ] = None,
) -> None:
    """Label every user turn of the chat log as SAT/DSAT/MIXED/NEUTRAL, in real time.

    Replicas with the same WILDLOOP_DETECTOR__CONSUMER_GROUP share the partitions."""
    from services.detector.factory import DetectorConfigError, build_cascade  # noqa: PLC0415
    from services.detector.metrics import DetectorMetrics  # noqa: PLC0415
    from services.detector.service import build_detector  # noqa: PLC0415

    cli = context(ctx)
    settings = cli.settings
    metrics = Metrics("detector")
    detector_metrics = DetectorMetrics(metrics, window_s=settings.detector.rate_window_s)
    try:
        cascade = build_cascade(settings.detector, metrics=detector_metrics.cascade)
    except DetectorConfigError as exc:
        fail(str(exc), code=2)
    store = cli.open_store()
    bus = cli.open_bus()
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = metrics.serve(settings.metrics_host, port)
    worker, service = build_detector(
        settings, bus=bus, store=store, cascade=cascade, metrics=detector_metrics
    )
    stop = _stop_on_signals()
    log.info(
        "detector started",
        extra={
            "bus": settings.bus_backend.value,
            "detector_version": cascade.version,
            "tiers": cascade.tier_names,
            "metrics_port": server.port,
        },
    )
    try:
        stats = worker.run(stop=stop, idle_timeout_s=idle_exit)
    finally:
        worker.close()
        service.publisher.close()
        server.close()
        bus.close()
        store.close()
    err.print(
        f"detector stopped: {stats.applied} applied, {stats.duplicates} duplicate(s), "
        f"{stats.dead_lettered} dead-lettered",
        highlight=False,
    )
