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
from scire_server.store.directory import cert_not_after


@dataclasses.dataclass(frozen=True)
class Counts:
    """Assignments by state, clients by status, and accepted clients seen lately."""

    assignments: dict[str, int]
    clients: dict[str, int]
    clients_online: int
    #: When the first accepted client's certificate ends (None: no certificate).
    client_cert_earliest_end: dt.datetime | None = None
    #: Accepted clients whose certificate ends within each window (days -> count).
    client_certs_ending: dict[int, int] = dataclasses.field(default_factory=dict)


#: The windows (days) of ``scire_client_certificates_ending``.
CERT_END_WINDOWS = (7, 30)


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
        now = utcnow()
        since = now - dt.timedelta(seconds=online_within)
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
            ends = [
                end
                for pem in session.scalars(
                    select(Client.cert_pem).where(Client.status == ClientStatus.ACCEPTED.value)
                )
                if (end := cert_not_after(pem)) is not None
            ]
        return Counts(
            assignments={str(state): int(n) for state, n in assignments},
            clients={str(status): int(n) for status, n in clients},
            clients_online=int(online or 0),
            client_cert_earliest_end=min(ends, default=None),
            client_certs_ending={
                days: sum(1 for end in ends if end <= now + dt.timedelta(days=days))
                for days in CERT_END_WINDOWS
            },
        )
