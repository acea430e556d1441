"""Signals between the daemons on one PostgreSQL: ``NOTIFY`` on a channel, and
a connection of its own that ``LISTEN``s (``relay`` runs both). SQLite has one
daemon and no signals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from scire_server.exceptions import Unavailable
from scire_server.store.database import Database

#: The channel "work changed for these clients" crosses daemons on.
WORK_CHANGED = "scire_work_due"
#: Bytes of one notification's payload: PostgreSQL refuses 8000 and more.
MAX_PAYLOAD = 7900


class Listening:
    """A dedicated autocommit connection that listens on one channel."""

    def __init__(self, connection: Any, channel: str) -> None:
        self._connection = connection
        self.channel = channel

    def wait(self, timeout: float) -> list[str]:
        """The payloads of the first batch to arrive within ``timeout`` seconds
        (none when none came); ``Unavailable`` when the connection is gone.
        Returns as soon as one packet of notifications is in: psycopg's
        ``stop_after`` counts notifications, and yields a whole packet."""
        import psycopg

        try:
            return [
                n.payload
                for n in self._connection.notifies(timeout=timeout, stop_after=1)
                if n.channel == self.channel
            ]
        except psycopg.Error as exc:
            raise Unavailable(f"database unavailable: {_first_line(exc)}") from exc

    def close(self) -> None:
        import psycopg

        try:
            self._connection.close()
        except psycopg.Error:
            pass  # a dead connection has nothing left to close


class Signals:
    """Send and receive notifications between the daemons."""

    def __init__(self, database: Database) -> None:
        self.db = database

    @property
    def available(self) -> bool:
        return self.db.postgres

    def notify(self, channel: str, payloads: Sequence[str]) -> None:
        """Send the payloads in one transaction: the other daemons get them at
        its commit, in order."""
        too_long = [p for p in payloads if len(p.encode()) > MAX_PAYLOAD]
        if too_long:
            raise ValueError(f"notification payload over {MAX_PAYLOAD} bytes")
        with self.db.tx() as session:
            for payload in payloads:
                session.execute(
                    sa.text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": channel, "payload": payload},
                )

    def listen(self, channel: str, connect_timeout: int = 10) -> Listening:
        """A new connection listening on ``channel`` (the engine's URL and
        settings, outside its pool); ``Unavailable`` when the database is not
        reachable."""
        # Imported here: psycopg is installed with PostgreSQL only (the extra).
        import psycopg
        import psycopg.sql

        _args, params = self.db.engine.dialect.create_connect_args(self.db.engine.url)
        params.setdefault("connect_timeout", connect_timeout)
        try:
            connection = psycopg.connect(**params, autocommit=True)
            connection.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        except psycopg.Error as exc:
            raise Unavailable(f"database unavailable: {_first_line(exc)}") from exc
        return Listening(connection, channel)


def _first_line(exc: Exception) -> str:
    """The driver's first line, never the URL or password."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
