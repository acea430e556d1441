"""agents' presence and callback address; schedules and their runs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 13:00:00.000000

Additive only: a daemon of the previous version keeps working on the new
schema (it leaves the new client columns NULL and never makes a scheduled run).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("expression", sa.String(length=255), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("allow_overlap", sa.Boolean(), nullable=False),
        sa.Column("catch_up", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("next_due_at", sa.DateTime(), nullable=True),
        sa.Column("last_due_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_schedules_owner_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint(
            "owner_id", "request_key", name=op.f("uq_schedules_owner_id_request_key")
        ),
    )
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_schedules_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(
            "ix_schedules_state_next_due_at", ["state", "next_due_at"], unique=False
        )

    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("agent_version", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("agent_mode", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("callback_address", sa.String(length=255), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("schedule_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("due_at", sa.DateTime(), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_schedule_id"), ["schedule_id"], unique=False)
        batch_op.create_unique_constraint(
            batch_op.f("uq_jobs_schedule_id_due_at"), ["schedule_id", "due_at"]
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_schedule_id_schedules"), "schedules", ["schedule_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_schedule_id_schedules"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("uq_jobs_schedule_id_due_at"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_jobs_schedule_id"))
        batch_op.drop_column("due_at")
        batch_op.drop_column("schedule_id")
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("callback_address")
        batch_op.drop_column("agent_mode")
        batch_op.drop_column("agent_version")
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.drop_index("ix_schedules_state_next_due_at")
        batch_op.drop_index(batch_op.f("ix_schedules_owner_id"))
    op.drop_table("schedules")
