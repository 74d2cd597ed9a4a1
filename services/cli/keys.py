"""``wildloop keys``: API keys of the gateway."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from services.cli.context import context, err, fail, out
from services.store import keys as key_store

app = typer.Typer(help="Create, list and disable gateway API keys.", no_args_is_help=True)


@app.command("create")
def create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")] = "default",
    name: Annotated[str, typer.Option(help="A label for operators.")] = "",
    admin: Annotated[bool, typer.Option(help="Also allow adapter operations.")] = False,
) -> None:
    """Create a key and print it once (only its digest is stored)."""
    store = context(ctx).open_store()
    scopes = frozenset({"chat", "admin"} if admin else {"chat"})
    try:
        key, info = key_store.create_key(store, tenant_id=tenant, name=name, scopes=scopes)
    except ValueError as exc:
        fail(str(exc), code=2)
    finally:
        store.close()
    typer.echo(key)
    err.print(
        f"created {info.id} for tenant {info.tenant_id!r} with scopes "
        f"{sorted(info.scopes)}; store the key now, it is not shown again",
        highlight=False,
    )


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
) -> None:
    """Keys (ids, tenants, scopes, state); secrets are never shown."""
    store = context(ctx).open_store()
    try:
        rows = key_store.list_keys(store, tenant_id=tenant)
    finally:
        store.close()
    table = Table(title="API keys")
    for col in ("id", "tenant", "name", "scopes", "state", "created"):
        table.add_column(col)
    for k in rows:
        table.add_row(
            k.id,
            k.tenant_id,
            k.name,
            ",".join(sorted(k.scopes)),
            "disabled" if k.disabled else "active",
            k.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(table)


@app.command("disable")
def disable(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="Key id, e.g. k3f9a...")]
) -> None:
    """Disable a key; gateways stop accepting it within their key-cache time (30 s)."""
    store = context(ctx).open_store()
    try:
        found = key_store.disable_key(store, key_id)
    finally:
        store.close()
    if not found:
        fail(f"no key {key_id!r}")
    err.print(f"disabled {key_id}", highlight=False)
