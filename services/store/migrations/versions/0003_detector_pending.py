"""detector pending turns

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 07:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "detector_pending",
        sa.Column("conversation_id", sa.String(length=256), nullable=False),
        sa.Column("turn_index", sa.Integer(), nullable=False),
        sa.Column("detector_version", sa.String(length=64), nullable=False),
        sa.Column(
            "event",
            sa.JSON().with_variant(sa.JSON(none_as_null=True), "postgresql"),
            nullable=False,
        ),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "conversation_id", "turn_index", "detector_version", name=op.f("pk_detector_pending")
        ),
    )
    with op.batch_alter_table("detector_pending", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_detector_pending_due_at"), ["due_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("detector_pending", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_detector_pending_due_at"))
    op.drop_table("detector_pending")
