"""Database tables (SQLAlchemy 2). Alembic's migrations in ``schema/`` build
exactly this ``metadata``; a test keeps the two equal.

Times are naive UTC everywhere (SQLite has no time zones).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Server(Base):
    """One row per server daemon (instance key), with its heartbeat."""

    __tablename__ = "servers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_key: Mapped[str] = mapped_column(String(255), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))  # running | stopped
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Client(Base):
    __tablename__ = "clients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # pending | accepted | rejected | revoked
    csr_pem: Mapped[str] = mapped_column(Text)
    # SHA-256 of the request's public key (SubjectPublicKeyInfo): a new request
    # for a pending name must carry the same key. NULL only for a request whose
    # CSR the migration that added the column could not read.
    key_fingerprint: Mapped[str | None] = mapped_column(String(64))
    cert_pem: Mapped[str | None] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(String(64), unique=True)
    facts: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    registered_at: Mapped[dt.datetime] = mapped_column(DateTime)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    decided_by: Mapped[str | None] = mapped_column(String(255))
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # What the agent said of itself on its last poll (``presence`` argument).
    agent_version: Mapped[str | None] = mapped_column(String(64))
    agent_mode: Mapped[str | None] = mapped_column(String(16))  # once | daemon
    # host:port of a daemon-mode agent's poll_now listener; NULL when it has none.
    callback_address: Mapped[str | None] = mapped_column(String(255))


class ClientGroup(Base):
    __tablename__ = "client_groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class ClientGroupMember(Base):
    """A client, or a nested group, inside a client group."""

    __tablename__ = "client_group_members"
    __table_args__ = (
        CheckConstraint("(client_id IS NULL) <> (member_group_id IS NULL)", name="one_member"),
        UniqueConstraint("group_id", "client_id"),
        UniqueConstraint("group_id", "member_group_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("client_groups.id", ondelete="CASCADE"))
    client_id: Mapped[int | None] = mapped_column(
        ForeignKey("clients.id", ondelete="CASCADE"), index=True
    )
    member_group_id: Mapped[int | None] = mapped_column(
        ForeignKey("client_groups.id", ondelete="CASCADE"), index=True
    )


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))  # active | revoked
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class UserGroup(Base):
    __tablename__ = "user_groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class UserGroupMember(Base):
    __tablename__ = "user_group_members"
    __table_args__ = (UniqueConstraint("group_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("user_groups.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)


class Grant(Base):
    """A user or user group may use a privilege on a client or client group."""

    __tablename__ = "grants"
    __table_args__ = (
        CheckConstraint("(user_id IS NULL) <> (user_group_id IS NULL)", name="one_subject"),
        CheckConstraint("(client_id IS NULL) <> (client_group_id IS NULL)", name="one_target"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    privilege: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    user_group_id: Mapped[int | None] = mapped_column(
        ForeignKey("user_groups.id", ondelete="CASCADE"), index=True
    )
    client_id: Mapped[int | None] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    client_group_id: Mapped[int | None] = mapped_column(
        ForeignKey("client_groups.id", ondelete="CASCADE")
    )
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    uses_left: Mapped[int] = mapped_column(Integer)


class Schedule(Base):
    """A recurring or deferred submission: each run is its own job, linked back
    by ``jobs.schedule_id`` and its ``due_at``."""

    __tablename__ = "schedules"
    __table_args__ = (
        Index("ix_schedules_state_next_due_at", "state", "next_due_at"),
        UniqueConstraint("owner_id", "request_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # at | every | cron
    # ISO time for "at", seconds for "every", the five cron fields for "cron".
    expression: Mapped[str] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    # The job spec each run is made from, with its hosts and groups.
    spec: Mapped[dict[str, object]] = mapped_column(JSON)
    allow_overlap: Mapped[bool] = mapped_column(Boolean, default=False)
    catch_up: Mapped[str] = mapped_column(String(16), default="once")  # once | all | skip
    state: Mapped[str] = mapped_column(String(16))  # active | paused | finished | deleted
    next_due_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_due_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    # The submitter's key for an idempotent submission, as jobs.request_key.
    request_key: Mapped[str | None] = mapped_column(String(64))


class Job(Base):
    """A job definition. ``request_key`` is the submitter's key for an idempotent
    submission: one owner, one key, one job (NULLs never collide). A run of a
    schedule carries ``schedule_id`` and ``due_at``, unique together, so two
    daemons can never make the same run twice."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "request_key"),
        UniqueConstraint("schedule_id", "due_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    script: Mapped[str] = mapped_column(Text)
    interpreter: Mapped[str] = mapped_column(String(255))
    privilege: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer)
    timeout: Mapped[int] = mapped_column(Integer)  # seconds
    output_limit: Mapped[int] = mapped_column(Integer)  # bytes
    not_before: Mapped[dt.datetime | None] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    max_attempts: Mapped[int] = mapped_column(Integer)
    rerun_on_agent_crash: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    request_key: Mapped[str | None] = mapped_column(String(64))
    schedule_id: Mapped[int | None] = mapped_column(ForeignKey("schedules.id"), index=True)
    due_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Assignment(Base):
    """One job on one client. ``priority`` and ``job_created_at`` copy the job's
    so the poll query is served by one index."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("job_id", "client_id"),
        Index("ix_assignments_poll", "client_id", "state", "priority", "job_created_at"),
        Index("ix_assignments_state_deadline", "state", "ack_deadline"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    job_created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    #: ``attempt`` when an operator last retried this host (0: never); the
    #: job's ``max_attempts`` counts the deliveries after it.
    retry_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    delivery_id: Mapped[str | None] = mapped_column(String(32))
    server_id: Mapped[int | None] = mapped_column(ForeignKey("servers.id"))
    ack_deadline: Mapped[dt.datetime | None] = mapped_column(DateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    output: Mapped[str | None] = mapped_column(Text)
    output_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(String(1000))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Event(Base):
    """The audit trail: one row per state change, decision or refusal."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    client: Mapped[str | None] = mapped_column(String(255))
    old_state: Mapped[str | None] = mapped_column(String(16))
    new_state: Mapped[str | None] = mapped_column(String(16))
    server: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[str | None] = mapped_column(Text)
