"""Alembic environment: runs on the connection wildloop hands over (see services.store.db)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from services.store.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:  # invoked by the alembic CLI: use the configured store
    from services.settings import WildloopSettings
    from services.store.db import make_engine

    engine = make_engine(WildloopSettings().store_url)
    with engine.begin() as conn:
        _run(conn)
else:
    _run(connection)
