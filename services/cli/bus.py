"""``wildloop bus``: inspect and maintain the event log."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from services.bus.embedded import EmbeddedEventLog
from services.cli.context import context, err, fail, out

app = typer.Typer(help="Inspect and maintain the event log.", no_args_is_help=True)


@app.command("topics")
def topics(ctx: typer.Context) -> None:
    """Topics and their partition counts."""
    bus = context(ctx).open_bus()
    try:
        found = bus.topics()
    except Exception as exc:
        fail(f"cannot list topics: {exc}")
    finally:
        bus.close()
    table = Table(title="topics")
    table.add_column("topic")
    table.add_column("partitions")
    for name, parts in sorted(found.items()):
        table.add_row(name, str(parts))
    out.print(table)


@app.command("prune")
def prune(
    ctx: typer.Context,
    older_than_hours: Annotated[
        float | None,
        typer.Option(help="Default: WILDLOOP_EMBEDDED_LOG__RETENTION_HOURS.", min=0),
    ] = None,
) -> None:
    """Delete embedded-log records older than the retention (Kafka applies its own retention)."""
    cli = context(ctx)
    bus = cli.open_bus()
    try:
        if not isinstance(bus, EmbeddedEventLog):
            fail("prune applies to the embedded log; Kafka topics use retention.ms", code=2)
        hours = cli.settings.embedded_log.retention_hours
        removed = bus.prune(
            older_than_s=(older_than_hours if older_than_hours is not None else hours) * 3600
        )
    finally:
        bus.close()
    err.print(f"deleted {removed} record(s)", highlight=False)
