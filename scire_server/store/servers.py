"""The daemons sharing the database: one ``servers`` row per instance key,
with its heartbeat. A row is ``running``, ``stopped`` (clean shutdown) or
``dead`` (another daemon found its heartbeat stale and took over its leases,
``Sweeps.take_over``); a dead or stale row's key may register again."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select, update

from scire_server.exceptions import InstanceConflict
from scire_server.models import Server
from scire_server.states import ServerState
from scire_server.store.database import Database, row_dict, utcnow

SERVER_FIELDS = ("instance_key", "hostname", "pid", "url", "state", "started_at", "heartbeat_at")


def advisory_key(task: str) -> int:
    """The PostgreSQL advisory lock key of a timed task: a signed 64-bit number
    every daemon derives alike from the task's name."""
    digest = hashlib.sha256(f"scire timed task {task}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Servers:
    """This daemon's row, and the list of all of them."""

    def __init__(self, database: Database) -> None:
        self.db = database
        self._pid: int | None = None
        self._hostname: str | None = None

    def start(
        self,
        instance_key: str,
        hostname: str,
        pid: int,
        url: str,
        stale_after: int,
        is_alive: Callable[[int], bool],
    ) -> dict[str, Any]:
        """Register this daemon, or refuse with ``InstanceConflict`` when another live
        one holds the key.

        ``is_alive(pid)`` says whether a pid runs on this host: the previous
        life of this key on the same host, when its process is gone, need not
        wait for its heartbeat to go stale.
        """
        now = utcnow()
        self._pid, self._hostname = pid, hostname
        with self.db.tx() as session:
            row = session.scalars(select(Server).where(Server.instance_key == instance_key)).first()
            if row is None:
                row = Server(
                    instance_key=instance_key,
                    hostname=hostname,
                    pid=pid,
                    url=url,
                    state=ServerState.RUNNING.value,
                    started_at=now,
                    heartbeat_at=now,
                )
                session.add(row)
                session.flush()
                self.db.server_id = row.id
                return {"previous_state": None, "server_id": row.id}
            fresh = row.heartbeat_at > now - dt.timedelta(seconds=stale_after)
            same_host_dead = row.hostname == hostname and (row.pid == pid or not is_alive(row.pid))
            if row.state == ServerState.RUNNING and fresh and not same_host_dead:
                raise InstanceConflict(
                    f"instance key {instance_key!r} is held by a live daemon "
                    f"(pid {row.pid} on {row.hostname}, heartbeat {row.heartbeat_at:%H:%M:%S} UTC); "
                    "give this daemon its own instance_key or stop the other one"
                )
            previous = {
                "previous_state": row.state,
                "previous_pid": row.pid,
                "previous_host": row.hostname,
            }
            row.hostname, row.pid, row.url = hostname, pid, url
            row.state, row.started_at, row.heartbeat_at = ServerState.RUNNING.value, now, now
            self.db.server_id = row.id
            return previous | {"server_id": row.id}

    def heartbeat(self) -> bool:
        """Tell the other daemons this one is alive; ``False`` when the row no
        longer says this process is running (another daemon found it silent
        and marked it ``dead``, or took the key over): the heartbeat never
        brings such a row back, the caller registers again."""
        with self.db.tx() as session:
            alive: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Server)
                .where(
                    Server.id == self.db.server_id,
                    Server.state == ServerState.RUNNING.value,
                    Server.pid == self._pid,
                    Server.hostname == self._hostname,
                )
                .values(heartbeat_at=utcnow())
            )
            return alive.rowcount == 1

    def state(self) -> str | None:
        """This daemon's row's state (``None`` before it started)."""
        with self.db.tx(write=False) as session:
            return session.scalar(select(Server.state).where(Server.id == self.db.server_id))

    def stop(self) -> None:
        """Mark this daemon's row ``stopped``."""
        with self.db.tx() as session:
            session.execute(
                update(Server)
                .where(Server.id == self.db.server_id)
                .values(state=ServerState.STOPPED.value, heartbeat_at=utcnow())
            )

    @contextlib.contextmanager
    def exclusive(self, task: str) -> Iterator[bool]:
        """Whether this daemon may run ``task`` now: on PostgreSQL, ``True`` while
        it holds the session-level advisory lock named after the task on a
        connection of its own, ``False`` (run nothing, the next tick tries
        again) when another daemon holds it. SQLite has one daemon: always
        ``True``. The lock goes with the connection, so a daemon that dies
        holding it frees it at once."""
        if not self.db.postgres:
            yield True
            return
        key = advisory_key(task)
        with self.db.errors(), self.db.engine.connect() as connection:
            held = bool(
                connection.execute(
                    sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
                ).scalar()
            )
            connection.commit()
            try:
                yield held
            finally:
                if held:
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()

    def listing(self) -> list[dict[str, Any]]:
        """Every daemon's row, with ``heartbeat_age``: seconds since its last
        heartbeat (a ``running`` row with an old one is a daemon about to be
        taken over)."""
        with self.db.tx(write=False) as session:
            rows = session.scalars(select(Server).order_by(Server.id)).all()
            now = utcnow()
            return [
                row_dict(r, *SERVER_FIELDS)
                | {"heartbeat_age": max(0, int((now - r.heartbeat_at).total_seconds()))}
                for r in rows
            ]
