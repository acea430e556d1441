"""assignments.retry_base: the delivery count when an operator last retried a host

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 21:45:00.000000

Additive only: the column has a server default of 0, so a daemon of the
previous version keeps inserting assignments (never retried) on the new schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("retry_base", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_column("retry_base")
