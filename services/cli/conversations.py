"""``wildloop conversations``: export, import and inspect logged conversations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.bus.typed import EventPublisher
from services.cli.context import context, err, fail, out
from services.conversations import turn_events
from services.formats import ConversationRecord, LineError, read_jsonl, write_jsonl_atomic

app = typer.Typer(help="Export, import and inspect logged conversations.", no_args_is_help=True)

Tenant = Annotated[str | None, typer.Option("--tenant", help="Only this tenant's conversations.")]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


@app.command("export")
def export(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON Lines file to write.")],
    tenant: Tenant = None,
) -> None:
    """Write every logged conversation of the store as JSON Lines (one conversation a line)."""
    store = context(ctx).open_store()
    try:
        total = store.count_conversations(tenant_id=tenant)
        with _progress() as progress:
            task = progress.add_task("exporting", total=total)

            def records():  # type: ignore[no-untyped-def]
                for rec in store.iter_conversations(tenant_id=tenant):
                    progress.advance(task)
                    yield rec.model_dump(mode="json", exclude_none=False)

            count = write_jsonl_atomic(output, records())
    except OSError as exc:
        fail(f"cannot write {output}: {exc}")
    finally:
        store.close()
    err.print(f"exported {count} conversation(s) to {output}", highlight=False)


@app.command("import")
def import_(
    ctx: typer.Context,
    input_: Annotated[Path, typer.Option("--input", "-i", help="Conversations JSON Lines.")],
    tenant: Annotated[str, typer.Option(help="Tenant to record them under.")] = "default",
) -> None:
    """Publish conversations from a file as chat-turn events (the recorder stores them).

    Event ids are derived from the content, so importing a file twice records it once. A
    malformed line is reported with its number and skipped (exit code 3).
    """
    cli = context(ctx)
    if not input_.is_file():
        fail(f"no such file: {input_}", code=2)
    bus = cli.open_bus()
    bus.ensure_topics(cli.settings.topics.all())
    publisher = EventPublisher(bus.publisher(), cli.settings.topics)
    bad = conversations = turns = 0
    try:
        with input_.open(encoding="utf-8", errors="replace") as stream:
            for number, item in read_jsonl(stream, ConversationRecord):
                if isinstance(item, LineError):
                    bad += 1
                    err.print(f"{input_}:{number}: skipped: {item.message}", highlight=False)
                    continue
                for event in turn_events(item, tenant_id=tenant):
                    publisher.publish(event)
                    turns += 1
                conversations += 1
        publisher.flush(timeout_s=60)
    finally:
        publisher.close()
        bus.close()
    err.print(f"published {turns} turn(s) of {conversations} conversation(s)", highlight=False)
    if bad:
        raise typer.Exit(3)


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 20,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    tenant: Tenant = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """The most recently active conversations."""
    store = context(ctx).open_store()
    try:
        rows = store.list_conversations(tenant_id=tenant, limit=limit, offset=offset)
        total = store.count_conversations(tenant_id=tenant)
    finally:
        store.close()
    if as_json:
        for r in rows:
            typer.echo(
                json.dumps(
                    {
                        "conversation_id": r.conversation_id,
                        "tenant_id": r.tenant_id,
                        "user_id": r.user_id,
                        "turns": r.turns,
                        "created_at": r.created_at.isoformat(),
                        "updated_at": r.updated_at.isoformat(),
                    }
                )
            )
        return
    table = Table(title=f"conversations {offset + 1}-{offset + len(rows)} of {total}")
    for col in ("id", "tenant", "user", "turns", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.conversation_id,
            r.tenant_id,
            r.user_id or "",
            str(r.turns),
            r.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


@app.command("show")
def show(
    ctx: typer.Context,
    conversation_id: Annotated[str, typer.Argument(help="Conversation id.")],
    tenant: Tenant = None,
    as_json: Annotated[bool, typer.Option("--json", help="The export record.")] = False,
) -> None:
    """One conversation with its messages, labels and explicit feedback."""
    store = context(ctx).open_store()
    try:
        record = store.get_conversation(conversation_id, tenant_id=tenant)
        if record is None:
            fail(f"no conversation {conversation_id!r}", code=1)
        labels = store.labels_for(conversation_id)
        feedback = store.feedback_for(conversation_id)
    finally:
        store.close()
    if as_json:
        typer.echo(record.model_dump_json())
        return
    by_turn: dict[int, list[str]] = {}
    for lab in labels:
        rubrics = ", ".join([*lab.sat, *lab.dsat]) or "-"
        by_turn.setdefault(lab.turn_index, []).append(
            f"{lab.polarity} [{rubrics}] {lab.confidence:.2f} ({lab.tier}, {lab.detector_version})"
        )
    for fb in feedback:
        note = f"thumbs {fb.rating}" + (f": {fb.comment}" if fb.comment else "")
        by_turn.setdefault(fb.turn_index, []).append(note)
    out.print(f"[bold]{record.conversation_id}[/]", highlight=False)
    for i, m in enumerate(record.messages):
        out.print(f"[cyan]{i:>3} {m.role:>9}[/]  {m.content}", highlight=False)
        for note in by_turn.get(i, []):
            out.print(f"{'':>15}[yellow]{note}[/]", highlight=False)
