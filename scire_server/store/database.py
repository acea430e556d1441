"""How the store talks to the database: the engine and its settings, one
transaction at a time, row locks, and the mapping of driver errors.

Writers on SQLite take the database lock at ``BEGIN`` (``BEGIN IMMEDIATE``) so
a read-then-write transaction can never fail half-way with "database is
locked"; readers start a deferred ``BEGIN`` and, under WAL, never wait for a
writer. On PostgreSQL the rows a transaction reads and then writes are locked
with ``FOR UPDATE`` (:meth:`Database.for_update`).

Driver errors never leave this module: :func:`database_errors` turns a busy
database or a serialization failure into ``Unavailable`` (the caller retries)
and an integrity error into ``Conflict`` naming the constraint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterator
from typing import Any, TypeVarTuple

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Select

from scire_server.exceptions import Conflict, Unavailable
from scire_server.models import Assignment

SQLITE_BUSY_TIMEOUT = 30_000  # milliseconds a writer waits for the SQLite lock
READ_ONLY = "scire_read_only"  # execution option of the engine that read transactions use
# PostgreSQL SQLSTATEs worth a retry: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

Columns = TypeVarTuple("Columns")


def utcnow() -> dt.datetime:
    """Now, as the naive UTC time every table stores."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """An engine with the settings Scire relies on (WAL and a busy timeout on SQLite)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is switched off so BEGIN is ours.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Readers start deferred and never wait for a writer (WAL).
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def constraint_name(exc: IntegrityError) -> str | None:
    """The constraint an integrity error broke, as the driver names it."""
    diag = getattr(exc.orig, "diag", None)  # psycopg
    if diag is not None and getattr(diag, "constraint_name", None):
        return str(diag.constraint_name)
    # SQLite names the columns instead: "UNIQUE constraint failed: clients.name".
    message = str(exc.orig)
    if "constraint failed: " in message:
        return message.split("constraint failed: ", 1)[1].strip()
    return None


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Re-raise driver errors as Scire's own: ``Unavailable`` or ``Conflict``."""
    try:
        yield
    except OperationalError as exc:
        sqlstate = getattr(exc.orig, "sqlstate", None)
        text = str(exc)
        if sqlstate in RETRYABLE_SQLSTATES or "locked" in text or "could not serialize" in text:
            raise Unavailable("database busy, try again") from exc
        # Unreachable, read-only, disk full: the caller may try again later or
        # elsewhere. The driver's first line, never the SQL (or the URL).
        first_line = str(exc.orig or exc.__class__.__name__).strip().splitlines()[0]
        raise Unavailable(f"database unavailable: {first_line}") from exc
    except IntegrityError as exc:
        what = constraint_name(exc) or str(exc.orig)
        raise Conflict(f"conflicts with an existing object: {what}") from exc


_AFTER_COMMIT = "scire_log_after_commit"


def log_after_commit(
    session: Session,
    logger: logging.Logger,
    level: int,
    message: str,
    *args: Any,
    extra: dict[str, Any] | None = None,
) -> None:
    """Log ``message`` once the session's transaction has committed, never for
    one that rolled back: an operator must not read "job 7 submitted" for a job
    the full disk refused."""
    session.info.setdefault(_AFTER_COMMIT, []).append((logger, level, message, args, extra))


class Database:
    """One database, and the daemon that writes to it.

    ``server_name`` signs every audit row; ``server_id`` is this daemon's row
    in ``servers`` once it has started (leases name it).
    """

    def __init__(self, engine: Engine, server_name: str) -> None:
        self.engine = engine
        self.server_name = server_name
        self.server_id: int | None = None
        self.postgres = engine.dialect.name == "postgresql"
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )
        # SQLite has one writer at a time; threads of this daemon queue on a
        # lock instead of in SQLite's busy handler, which sleeps and retries.
        self._sqlite_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @contextlib.contextmanager
    def tx(self, write: bool = True) -> Iterator[Session]:
        """One transaction. ``write=False`` for reads: on SQLite they neither
        take the write lock nor queue behind writers."""
        with database_errors():
            if not write:
                with self._read_sessions.begin() as session:
                    yield session
                return
            with self._sqlite_lock:
                with self._sessions.begin() as session:
                    yield session
                # Committed: only now may the log say it happened.
                for logger, level, message, args, extra in session.info.pop(_AFTER_COMMIT, ()):
                    logger.log(level, message, *args, extra=extra)

    def for_update(self, query: Select[*Columns], skip_locked: bool = False) -> Select[*Columns]:
        """Lock the assignment rows a read-then-write transaction reads.

        On PostgreSQL (READ COMMITTED) a row read without a lock may change
        under us; ``FOR UPDATE`` re-reads it after the other writer commits.
        Sweeps skip rows another daemon holds (it is handling them). SQLite
        needs nothing: ``BEGIN IMMEDIATE`` already serializes writers.
        """
        if self.postgres:
            return query.with_for_update(of=Assignment, skip_locked=skip_locked)
        return query

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def row_dict(obj: Any, *names: str) -> dict[str, Any]:
    """The named attributes of an ORM row, as a plain dict for an answer."""
    return {name: getattr(obj, name) for name in names}
