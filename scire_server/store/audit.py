"""The audit trail: one ``events`` row per state change, decision or refusal.

:meth:`AuditTrail.write` and :meth:`AuditTrail.move` join the caller's
transaction, so a change and its row commit together; ``move`` is the one way
an assignment changes state. :meth:`AuditTrail.record` writes a row in a
transaction of its own (a refused call, whose own transaction rolled back).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Protocol, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from scire_schema import logformat
from scire_server.exceptions import IllegalTransition
from scire_server.models import Assignment, Event
from scire_server.states import State, allowed
from scire_server.store.database import Database, log_after_commit, utcnow

log = logging.getLogger(__name__)

_PENDING_ROWS = "scire.audit_rows"  # session.info key: rows written, not yet inserted
_EVENTS = cast(Table, Event.__table__)

EVENT_FIELDS = (
    "id",
    "at",
    "actor",
    "action",
    "job_id",
    "client",
    "old_state",
    "new_state",
    "server",
    "detail",
)


class Movable(Protocol):
    """An assignment as ``move`` changes it: the ORM row, or the store's Core-read
    :class:`~scire_server.store.assignments.LiveRow` of the agent's hot path."""

    job_id: int
    state: str
    updated_at: dt.datetime


class AuditTrail:
    """Writes and lists the audit rows of one database, signed by its daemon."""

    def __init__(self, database: Database) -> None:
        self.db = database
        database.write_pending_with(self._insert_pending)

    def write(
        self,
        session: Session,
        actor: str,
        action: str,
        *,
        job_id: int | None = None,
        client: str | None = None,
        old: str | None = None,
        new: str | None = None,
        detail: str | None = None,
        at: dt.datetime | None = None,
    ) -> None:
        """Add one audit row to the caller's transaction. The rows of one
        transaction are inserted together, in one executemany (the ORM inserts
        them one statement each on SQLite, to read back each id)."""
        session.info.setdefault(_PENDING_ROWS, []).append(
            {
                "at": at or utcnow(),
                "actor": actor,
                "action": action,
                "job_id": job_id,
                "client": client,
                "old_state": old,
                "new_state": new,
                "server": self.db.server_name,
                "detail": detail,
            }
        )

    @staticmethod
    def _insert_pending(session: Session) -> None:
        rows = session.info.pop(_PENDING_ROWS, None)
        if rows:
            # Straight to the connection: through the session it is the ORM's bulk path.
            session.connection().execute(insert(_EVENTS), rows)

    def move(
        self,
        session: Session,
        assignment: Assignment | Movable,
        to: State,
        *,
        by: str,
        client: str,
        action: str,
        why: str | None = None,
        now: dt.datetime | None = None,
    ) -> None:
        """Move an assignment to ``to`` in the caller's transaction, with its audit
        row and log line; a move the state table forbids raises ``IllegalTransition``."""
        old = assignment.state
        if not allowed(old, to):
            raise IllegalTransition(
                f"job {assignment.job_id} on {client}: {old} -> {to.value} is not allowed"
            )
        now = now or utcnow()
        assignment.state = to.value
        assignment.updated_at = now
        self.write(
            session,
            by,
            action,
            job_id=assignment.job_id,
            client=client,
            old=old,
            new=to.value,
            detail=why,
            at=now,
        )
        log_after_commit(
            session,
            log,
            logging.INFO,
            "job %s on %s: %s -> %s (%s%s)",
            assignment.job_id,
            client,
            old,
            to.value,
            by,
            f": {why}" if why else "",
            extra=logformat.event(
                job=assignment.job_id, client=client, who=by, what=f"{old} -> {to.value}"
            ),
        )

    def record(self, actor: str, action: str, **fields: Any) -> None:
        """Write one audit row in a transaction of its own."""
        with self.db.tx() as session:
            self.write(session, actor, action, **fields)

    def events(
        self, job_id: int | None = None, client: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` audit rows (of one job or client), oldest first."""
        with self.db.tx(write=False) as session:
            query = select(Event).order_by(Event.id.desc()).limit(limit)
            if job_id is not None:
                query = query.where(Event.job_id == job_id)
            if client is not None:
                query = query.where(Event.client == client)
            rows = session.scalars(query).all()
            return [{name: getattr(e, name) for name in EVENT_FIELDS} for e in reversed(rows)]
