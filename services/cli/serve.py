"""``wildloop serve``: long-running services."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Annotated

import typer

from services.cli.context import context, err, fail
from services.metrics import Metrics
from services.recorder import build_recorder
from services.settings import WildloopSettings
from services.worker import ConsumerWorker

app = typer.Typer(help="Run a long-running wildloop service.", no_args_is_help=True)
log = logging.getLogger("wildloop.serve")

PLUGIN_GROUP = "wildloop.serve"
COMMANDS_GROUP = "wildloop.commands"


def register_plugins() -> None:
    """Add ``wildloop serve <name>`` for every installed component that declares an entry point
    in the ``wildloop.serve`` group (e.g. the gateway). The core CLI never imports components;
    they plug themselves in, so dependencies keep pointing inward."""
    for ep in entry_points(group=PLUGIN_GROUP):
        app.command(ep.name)(ep.load())


def register_command_groups(root: typer.Typer) -> None:
    """Add ``wildloop <name> ...`` for every component declaring a typer app in the
    ``wildloop.commands`` group (e.g. ``wildloop learn``)."""
    for ep in entry_points(group=COMMANDS_GROUP):
        root.add_typer(ep.load(), name=ep.name)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


MetricsPortOption = Annotated[
    int | None, typer.Option(help="Port of /metrics (default: WILDLOOP_METRICS_PORT).")
]
IdleExitOption = Annotated[
    float | None,
    typer.Option(help="Exit after this many seconds without new events (batch use)."),
]


def _run_worker(
    name: str,
    settings: WildloopSettings,
    worker: ConsumerWorker,
    metrics: Metrics,
    *,
    metrics_port: int | None,
    idle_exit: float | None,
    resources: list[Callable[[], None]],
    **started: object,
) -> None:
    """Serve /metrics, consume until SIGTERM/SIGINT (or idle), then close the worker and
    ``resources`` (close callables, in order) and report what was consumed."""
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = metrics.serve(settings.metrics_host, port)
    stop = _stop_on_signals()
    log.info(
        f"{name} started",
        extra={"bus": settings.bus_backend.value, "metrics_port": server.port, **started},
    )
    try:
        stats = worker.run(stop=stop, idle_timeout_s=idle_exit)
    finally:
        worker.close()
        server.close()
        for close in resources:
            close()
    err.print(
        f"{name} stopped: {stats.applied} applied, {stats.duplicates} duplicate(s), "
        f"{stats.dead_lettered} dead-lettered",
        highlight=False,
    )


@app.command("recorder")
def recorder(
    ctx: typer.Context,
    metrics_port: MetricsPortOption = None,
    idle_exit: IdleExitOption = None,
) -> None:
    """Keep the store in step with the event log (turns, feedback, labels, adapter events)."""
    cli = context(ctx)
    store = cli.open_store()
    bus = cli.open_bus()
    metrics = Metrics("recorder")
    worker = build_recorder(cli.settings, bus=bus, store=store, metrics=metrics)
    _run_worker(
        "recorder",
        cli.settings,
        worker,
        metrics,
        metrics_port=metrics_port,
        idle_exit=idle_exit,
        resources=[bus.close, store.close],
    )


@app.command("detector")
def detector(
    ctx: typer.Context,
    metrics_port: MetricsPortOption = None,
    idle_exit: IdleExitOption = None,
) -> None:
    """Label every user turn of the chat log as SAT/DSAT/MIXED/NEUTRAL, in real time.

    Replicas with the same WILDLOOP_DETECTOR__CONSUMER_GROUP share the partitions."""
    from services.detector.factory import DetectorConfigError  # noqa: PLC0415
    from services.detector.service import open_detector  # noqa: PLC0415

    cli = context(ctx)
    store = cli.open_store()
    bus = cli.open_bus()
    metrics = Metrics("detector")
    try:
        worker, service = open_detector(cli.settings, bus=bus, store=store, metrics=metrics)
    except DetectorConfigError as exc:
        bus.close()
        store.close()
        fail(str(exc), code=2)
    _run_worker(
        "detector",
        cli.settings,
        worker,
        metrics,
        metrics_port=metrics_port,
        idle_exit=idle_exit,
        resources=[service.close, bus.close, store.close],
        detector_version=service.version,
        tiers=service.cascade.tier_names,
    )
