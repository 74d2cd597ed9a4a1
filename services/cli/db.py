"""``wildloop db``: the store's schema."""

from __future__ import annotations

import typer

from services.cli.context import context, out
from services.store import db as store_db

app = typer.Typer(help="Inspect and migrate the store's schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade(ctx: typer.Context) -> None:
    """Apply pending migrations (every service also does this on start)."""
    store = context(ctx).open_store()
    out.print(f"store at revision {store_db.current_revision(store.engine)}")
    store.close()


@app.command("current")
def current(ctx: typer.Context) -> None:
    """Print the store's schema revision and the newest one this code knows."""
    settings = context(ctx).settings
    engine = store_db.make_engine(settings.store_url)
    try:
        out.print(f"current: {store_db.current_revision(engine)}  head: {store_db.head_revision()}")
    finally:
        engine.dispose()
