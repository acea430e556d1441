"""What the operator's tools read: the database's pulse and a few counts.

``ping`` answers whether the database answers (``/healthz``, ``scire-server
check``); ``counts`` is the one query behind the state gauges of
``/metrics``, which the caller caches (``scire_server.monitoring``): a scrape
never runs it more than once per refresh interval. Both only read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from sqlalchemy import func, select

from scire_server.models import Assignment, Client, Server
from scire_server.states import ClientStatus
from scire_server.store.database import Database, utcnow


@dataclasses.dataclass(frozen=True)
class Counts:
    """Assignments by state, clients by status, and accepted clients seen lately."""

    assignments: dict[str, int]
    clients: dict[str, int]
    clients_online: int


class Overview:
    """Read-only questions about the whole database."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def ping(self) -> None:
        """Read one row of a real table (``Unavailable`` when the database does not answer)."""
        with self.db.tx(write=False) as session:
            session.execute(select(Server.id).limit(1)).all()

    def counts(self, online_within: int) -> Counts:
        """The counts; a client is online when accepted and heard from within
        ``online_within`` seconds."""
        since = utcnow() - dt.timedelta(seconds=online_within)
        with self.db.tx(write=False) as session:
            assignments = session.execute(
                select(Assignment.state, func.count()).group_by(Assignment.state)
            ).all()
            clients = session.execute(
                select(Client.status, func.count()).group_by(Client.status)
            ).all()
            online = session.scalar(
                select(func.count())
                .select_from(Client)
                .where(Client.status == ClientStatus.ACCEPTED.value, Client.last_seen_at >= since)
            )
        return Counts(
            assignments={str(state): int(n) for state, n in assignments},
            clients={str(status): int(n) for status, n in clients},
            clients_online=int(online or 0),
        )
