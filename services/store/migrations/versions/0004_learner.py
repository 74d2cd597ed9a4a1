"""learner: leases (one training run at a time) and preference pair lineage

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 21:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(sa.JSON(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    with op.batch_alter_table("preference_pairs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("details", _JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("preference_pairs", schema=None) as batch_op:
        batch_op.drop_column("details")
        batch_op.drop_column("tenant_id")
    op.drop_table("leases")
