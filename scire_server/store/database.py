"""How the store talks to the database: the engine and its settings, one
transaction at a time, row locks, and the mapping of driver errors.

Writers on SQLite take the database lock at ``BEGIN`` (``BEGIN IMMEDIATE``) so
a read-then-write transaction can never fail half-way with "database is
locked"; readers start a deferred ``BEGIN`` and, under WAL, never wait for a
writer. On PostgreSQL the rows a transaction reads and then writes are locked
with ``FOR UPDATE`` (:meth:`Database.for_update`).

Driver errors never leave this module: :meth:`Database.errors` turns a busy
database or a serialization failure into ``Unavailable`` (the caller retries),
an unreachable PostgreSQL into ``DatabaseUnreachable`` (counted by the
:class:`~scire_server.store.outage.Outage`, logged once per outage) and an
integrity error into ``Conflict`` naming the constraint. A database URL is
shown only through :func:`redacted`, a driver's message only through
:func:`driver_words`: no password reaches an output or a log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVarTuple

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.sql import Select

from scire_server.exceptions import (
    ConfigError,
    Conflict,
    InstanceConflict,
    Unavailable,
)
from scire_server.models import Assignment
from scire_server.store.outage import Outage

log = logging.getLogger("scire_server.store")

SQLITE_BUSY_TIMEOUT = 30_000  # milliseconds a writer waits for the SQLite lock
READ_ONLY = "scire_read_only"  # execution option of the engine that read transactions use
# PostgreSQL SQLSTATEs worth a retry: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# SQLSTATEs that mean "this server cannot take the transaction now": a shut
# down or restarting server (57P01-57P03), a connection exception (08...), a
# read-only server (25006: a demoted primary or a standby) and too many
# connections (53300).
UNREACHABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "25006", "53300"})
CONNECT_TIMEOUT = 5  # seconds one connection attempt to PostgreSQL may take
POOL_TIMEOUT = 10  # seconds a thread waits for a pooled connection before "busy"
# Connections beyond max_threads: the timed tasks (APScheduler runs several at
# once), the health probe, the metrics' counts and the relay between daemons.
EXTRA_CONNECTIONS = 8
# pg_advisory_xact_lock key of the migrations: the first 8 bytes of
# SHA-256("scire-migrations"), so no other lock of ours (or of a neighbour
# sharing the database) picks it by chance.
MIGRATION_LOCK = int.from_bytes(
    hashlib.sha256(b"scire-migrations").digest()[:8], "big", signed=True
)
DRIVER_HINT = "pip install 'scire[postgresql]'"

Columns = TypeVarTuple("Columns")


def utcnow() -> dt.datetime:
    """Now, as the naive UTC time every table stores."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# --- URLs and words without passwords --------------------------------------------------


def _parsed(url: str | URL) -> URL | None:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def redacted(url: str | URL) -> str:
    """The URL with its password hidden, as every output and log shows it; the
    hosts of a multi-host URL stay readable (``host=a:5432``)."""
    parsed = _parsed(url)
    if parsed is None:
        # Not a URL SQLAlchemy reads: hide whatever sits between "user:" and "@".
        return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", str(url))
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    text = parsed.render_as_string(hide_password=True)
    return urllib.parse.unquote(text) if "?" in text else text


def driver_words(exc: BaseException, url: str | URL) -> str:
    """The first line of a driver's error, password hidden: libpq may quote
    the conninfo (``password=...``) or the URL."""
    orig = getattr(exc, "orig", None)
    lines = str(orig or exc).strip().splitlines()
    first = lines[0].strip() if lines else exc.__class__.__name__
    parsed = _parsed(url)
    if parsed is not None and parsed.password:
        first = first.replace(str(parsed.password), "***")
        first = first.replace(urllib.parse.quote(str(parsed.password), safe=""), "***")
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", first)


def missing_driver(exc: ModuleNotFoundError, url: str | URL) -> ConfigError:
    """The one line for a database URL whose driver is not installed."""
    scheme = str(url).split(":", 1)[0]
    module = exc.name or "its driver"
    if scheme.startswith("postgresql"):
        return ConfigError(
            f"the database URL {redacted(url)} needs the PostgreSQL driver ({module}), "
            f"which is not installed: {DRIVER_HINT}"
        )
    return ConfigError(
        f"the database URL {redacted(url)} needs the Python module {module}, which is not installed"
    )


# --- the engine ----------------------------------------------------------------------


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine with the settings Scire relies on: WAL and a busy timeout on
    SQLite; on PostgreSQL a pool of ``pool_size`` connections checked before
    use (a restarted server costs no call), and a connect timeout so an
    unreachable server fails in seconds. A multi-host URL
    (``?host=a:5432&host=b:5433&target_session_attrs=read-write``) passes
    through to libpq untouched. ``ConfigError`` when the URL is bad or its
    driver is missing."""
    try:
        if url.startswith("sqlite"):
            return _sqlite_engine(url)
        connect_args: dict[str, Any] = {}
        if url.startswith("postgresql"):
            query = _parsed(url)
            if query is None or "connect_timeout" not in query.query:
                connect_args["connect_timeout"] = CONNECT_TIMEOUT
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=pool_size // 2,
            pool_timeout=POOL_TIMEOUT,
            connect_args=connect_args,
        )
    except ModuleNotFoundError as exc:
        raise missing_driver(exc, url) from None
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"the database URL {redacted(url)} is not valid: {exc}") from None


def daemon_pool_size(max_threads: int) -> int:
    """Pooled connections a daemon with ``max_threads`` workers needs."""
    return max_threads + EXTRA_CONNECTIONS


def _sqlite_engine(url: str) -> Engine:
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


def unreachable(exc: SQLAlchemyError) -> bool:
    """Whether a driver error means the server does not answer (as opposed
    to refusing this one statement)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, InterfaceError):  # "the connection is closed"
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in UNREACHABLE_SQLSTATES or sqlstate.startswith("08")
    # No SQLSTATE: psycopg could not connect at all.
    return isinstance(exc, OperationalError)


def wait_until_reachable(
    url: str,
    wait: float,
    on_retry: Callable[[str, float], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Connect to the database, retrying with backoff for up to ``wait``
    seconds; ``on_retry(why, pause)`` hears each failed attempt. ``Unavailable``
    with the last reason when the time is up; ``ConfigError`` at once for a bad
    URL or a missing driver."""
    engine = make_engine(url, pool_size=1)
    deadline = clock() + wait
    pause = 2.0  # so the attempts' lines come at most every 2 s
    try:
        while True:
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
                return
            except SQLAlchemyError as exc:
                why = driver_words(exc, url)
                left = deadline - clock()
                if left <= 0:
                    raise Unavailable(
                        f"the database {redacted(url)} did not answer within {wait:g} s: {why}"
                    ) from None
                step = min(pause, left)
                on_retry(why, step)
                sleep(step)
                pause = min(pause * 2, 10.0)
    finally:
        engine.dispose()


def migration_lock(connection: Connection) -> None:
    """Hold PostgreSQL's migration lock until ``connection``'s transaction ends:
    of several daemons starting at once, one migrates and the others wait,
    then find nothing to do. SQLite needs none (one daemon per file)."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for another database or ``:memory:``."""
    parsed = _parsed(url)
    if parsed is None or parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).absolute()


class SqliteDaemonLock:
    """The OS lock that keeps a SQLite file to one daemon: ``flock`` on
    ``<file>.lock`` beside it, held for the daemon's life. The kernel drops it
    when the process ends however it ends, so a ``kill -9`` never blocks the
    next start."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._file: IO[str] | None = None

    def acquire(self, instance_key: str) -> None:
        """Take the lock; ``InstanceConflict`` naming the holder when another
        daemon has it."""
        lock_file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another daemon"
            lock_file.close()
            raise InstanceConflict(
                f"the SQLite database {self.path.with_suffix('').name} is in use by {holder}: "
                "SQLite serves one daemon only; stop that one, or use PostgreSQL for several"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"daemon {instance_key!r} (pid {os.getpid()})\n")
        lock_file.flush()
        self._file = lock_file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
        self.outage = Outage(redacted(engine.url))
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )
        # SQLite has one writer at a time; threads of this daemon queue on a
        # lock instead of in SQLite's busy handler, which sleeps and retries.
        self._sqlite_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        self._pending_writers: list[Callable[[Session], None]] = []
        event.listen(self._sessions, "do_orm_execute", self._write_pending_before)

    def write_pending_with(self, writer: Callable[[Session], None]) -> None:
        """Have ``writer`` write what it kept for a write transaction (rows it
        gathers to insert in one batch) before each statement the transaction
        runs, so it reads its own writes, and before the commit."""
        self._pending_writers.append(writer)

    def _write_pending_before(self, state: ORMExecuteState) -> None:
        for writer in self._pending_writers:
            writer(state.session)

    @contextlib.contextmanager
    def tx(self, write: bool = True) -> Iterator[Session]:
        """One transaction. ``write=False`` for reads: on SQLite they neither
        take the write lock nor queue behind writers."""
        with self.errors():
            if not write:
                with self._read_sessions.begin() as session:
                    yield session
                return
            with self._sqlite_lock:
                with self._sessions.begin() as session:
                    yield session
                    for writer in self._pending_writers:
                        writer(session)
                # Committed: only now may the log say it happened.
                for logger, level, message, args, extra in session.info.pop(_AFTER_COMMIT, ()):
                    logger.log(level, message, *args, extra=extra)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Re-raise driver errors as Scire's own: ``Unavailable`` (busy; or
        ``DatabaseUnreachable``, through the outage tracker, for a PostgreSQL
        that does not answer) or ``Conflict``."""
        try:
            yield
        except IntegrityError as exc:
            what = constraint_name(exc) or driver_words(exc, self.engine.url)
            raise Conflict(f"conflicts with an existing object: {what}") from exc
        except PoolTimeout as exc:
            raise Unavailable("database busy (no free connection), try again") from exc
        except (OperationalError, DBAPIError) as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            text = str(exc)
            if sqlstate in RETRYABLE_SQLSTATES or "locked" in text or "could not serialize" in text:
                raise Unavailable("database busy, try again") from exc
            why = driver_words(exc, self.engine.url)
            if self.postgres and unreachable(exc):
                raise self.outage.failed(why) from None
            if isinstance(exc, OperationalError):
                # SQLite read-only or full: the caller may try again later.
                raise Unavailable(f"database unavailable: {why}") from exc
            raise
        else:
            self.outage.answered()

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
