"""jobs.request_key (idempotent submission) and clients.key_fingerprint (enrollment)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000

Additive only: a daemon of the previous version keeps working on the new
schema (it writes NULL keys, which never collide). The key fingerprint of each
stored request is filled in from its CSR; a CSR that cannot be read keeps
NULL, and a new request for that pending name is then refused until an
administrator rejects or deletes the old one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scire_schema import certs
from scire_schema.errors import CertificateError

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_fingerprint", sa.String(length=64), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_key", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f("uq_jobs_owner_id_request_key"), ["owner_id", "request_key"]
        )

    clients = sa.table(
        "clients",
        sa.column("id", sa.Integer),
        sa.column("csr_pem", sa.Text),
        sa.column("key_fingerprint", sa.String),
    )
    connection = op.get_bind()
    for client_id, csr_pem in connection.execute(sa.select(clients.c.id, clients.c.csr_pem)).all():
        try:
            fingerprint = certs.key_fingerprint(certs.load_csr(csr_pem))
        except CertificateError:
            continue
        connection.execute(
            clients.update().where(clients.c.id == client_id).values(key_fingerprint=fingerprint)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_jobs_owner_id_request_key"), type_="unique")
        batch_op.drop_column("request_key")
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("key_fingerprint")
