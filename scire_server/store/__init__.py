"""Every database read and write of the server, and nothing else.

The store is split by what each part writes (see docs/ARCHITECTURE.md):

* ``database``: engine, transactions, row locks, driver errors mapped, URLs redacted;
* ``outage``: one log line when the database stops answering, one when it is back;
* ``records``: the plain values handed in and out (``Caller``, ``JobSpec``...);
* ``audit``: the audit trail and ``move``, the one way an assignment changes state;
* ``directory``: users, clients and enrollment, groups, grants, the ACL's facts;
* ``jobs``: submit, list, detail, cancel;
* ``schedules``: schedules (at, every, cron) and the runs they make when due;
* ``assignments``: the agent's poll, acknowledgement and report;
* ``sweeps``: leases, expiry, lost runs, retention;
* ``servers``: the daemons' rows and heartbeats, the advisory locks of timed work;
* ``signals``: NOTIFY and LISTEN between daemons (PostgreSQL);
* ``overview``: the database's pulse and the counts behind the metrics (reads only).

Each public method of a part is one transaction, and a state change and its
audit row commit together. Functions that take a ``session`` join the
caller's transaction and are for the other parts of the store only.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from scire_server.store.assignments import Assignments
from scire_server.store.audit import AuditTrail
from scire_server.store.database import (
    Database,
    SqliteDaemonLock,
    daemon_pool_size,
    make_engine,
    redacted,
    sqlite_path,
    utcnow,
    wait_until_reachable,
)
from scire_server.store.directory import Directory
from scire_server.store.jobs import Jobs
from scire_server.store.overview import Counts, Overview
from scire_server.store.records import (
    SERVER,
    AgentPresence,
    Caller,
    Certificate,
    JobSpec,
    PollResult,
    PushTarget,
    Repairs,
    RetryResult,
    ScheduleResult,
    SubmitResult,
    Takeover,
)
from scire_server.store.schedules import Schedules
from scire_server.store.servers import Servers
from scire_server.store.signals import Signals
from scire_server.store.sweeps import Sweeps

__all__ = [
    "SERVER",
    "AgentPresence",
    "Caller",
    "Certificate",
    "Counts",
    "JobSpec",
    "PollResult",
    "PushTarget",
    "Repairs",
    "RetryResult",
    "ScheduleResult",
    "Store",
    "SqliteDaemonLock",
    "SubmitResult",
    "Takeover",
    "daemon_pool_size",
    "make_engine",
    "redacted",
    "sqlite_path",
    "utcnow",
    "wait_until_reachable",
]


class Store:
    """The server's database, one attribute per part. ``server_name`` signs every
    audit row this store writes."""

    def __init__(self, engine: Engine, server_name: str) -> None:
        self.database = Database(engine, server_name)
        self.audit = AuditTrail(self.database)
        self.directory = Directory(self.database, self.audit)
        self.jobs = Jobs(self.database, self.audit)
        self.schedules = Schedules(self.database, self.audit)
        self.assignments = Assignments(self.database, self.audit)
        self.sweeps = Sweeps(self.database, self.audit)
        self.servers = Servers(self.database)
        self.signals = Signals(self.database)
        self.overview = Overview(self.database)

    def close(self) -> None:
        """Close every pooled connection."""
        self.database.close()
