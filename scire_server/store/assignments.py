"""The agent's side of an assignment: the poll (reconcile, claim, the ACL at
dispatch), the acknowledgement and the status report.

The poll returns job values (:class:`documents.JobDocument`), not XML: the API
renders the job files after the claim has committed, so rendering never holds
the SQLite write lock.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scire_schema import documents
from scire_server import acl
from scire_server.exceptions import IllegalTransition, NotHeld, ScireError
from scire_server.models import Assignment, Client, Job, User
from scire_server.states import FINAL, State, allowed
from scire_server.store import directory
from scire_server.store.audit import AuditTrail
from scire_server.store.database import Database, log_after_commit, utcnow
from scire_server.store.records import SERVER, Acknowledged, AgentPresence, Caller, PollResult

log = logging.getLogger(__name__)

#: Report results: the report changed the assignment, changed nothing (the same
#: state again), or came after the assignment was cancelled, expired or denied.
APPLIED, DUPLICATE, IGNORED = "applied", "duplicate", "ignored"


_ASSIGNMENTS = cast(sa.Table, Assignment.__table__)
#: What the acknowledgement and the reports read and may change.
_LIVE_COLUMNS = tuple(
    _ASSIGNMENTS.c[name]
    for name in (
        "id",
        "job_id",
        "state",
        "delivery_id",
        "acknowledged_at",
        "started_at",
        "finished_at",
        "exit_code",
        "output",
        "output_truncated",
        "reason",
        "updated_at",
    )
)


_JOBS = cast(sa.Table, Job.__table__)
_USERS = cast(sa.Table, User.__table__)
#: What the claim reads: the assignment as a :class:`LiveRow` (the ``a_`` columns)
#: and the job file's values (the ``j_`` columns).
_CLAIM_COLUMNS = tuple(
    _ASSIGNMENTS.c[name].label(f"a_{name}")
    for name in ("id", "job_id", "state", "attempt", "retry_base", "updated_at")
) + tuple(
    _JOBS.c[name].label(f"j_{name}")
    for name in (
        "name",
        "owner_id",
        "privilege",
        "priority",
        "timeout",
        "output_limit",
        "interpreter",
        "created_at",
        "script",
        "not_before",
        "expires_at",
        "rerun_on_agent_crash",
    )
)
#: The claim: a client's pending assignments that may start now, best first.
_CLAIM = (
    select(*_CLAIM_COLUMNS)
    .join(_JOBS, _JOBS.c.id == _ASSIGNMENTS.c.job_id)
    .where(
        _ASSIGNMENTS.c.client_id == sa.bindparam("claim_client"),
        _ASSIGNMENTS.c.state == State.PENDING.value,
        sa.or_(_JOBS.c.not_before.is_(None), _JOBS.c.not_before <= sa.bindparam("claim_now")),
    )
    .order_by(_ASSIGNMENTS.c.priority.desc(), _ASSIGNMENTS.c.job_created_at, _ASSIGNMENTS.c.id)
    .limit(sa.bindparam("claim_limit", type_=sa.Integer))
)


class LiveRow:
    """One assignment's columns read with Core: reads and writes attributes as an
    ORM row would, and remembers what was set for :func:`write_back`. The
    agent's acknowledgements and reports go through these, not the ORM, whose
    loading and unit of work cost more than the statements themselves."""

    __slots__ = ("_values", "changed")

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "changed", {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value
        self.changed[name] = value


def write_back(session: Session, rows: Iterable[LiveRow]) -> None:
    """Store what was set on ``rows``: one executemany per set of changed columns."""
    batches: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row.changed:
            names = tuple(sorted(row.changed))
            batches.setdefault(names, []).append(
                {"row_id": row.id} | {f"new_{name}": row.changed[name] for name in names}
            )
    for names, params in batches.items():
        statement = (
            update(_ASSIGNMENTS)
            .where(_ASSIGNMENTS.c.id == sa.bindparam("row_id"))
            .values({name: sa.bindparam(f"new_{name}") for name in names})
        )
        session.connection().execute(statement, params)


class Assignments:
    """What the agents' calls write: claims, acknowledgements, reports."""

    def __init__(self, database: Database, audit: AuditTrail) -> None:
        self.db = database
        self.audit = audit

    def poll(
        self,
        client: Caller,
        held: Sequence[int],
        running: Sequence[int],
        limit: int,
        ack_timeout: int,
        presence: AgentPresence | None = None,
    ) -> PollResult:
        """Reconcile what the agent holds, then claim up to ``limit`` due jobs for it.

        Claiming, the ACL check, and marking ``sent`` happen in this one
        transaction, so a crash leaves each assignment either pending or sent
        with a lease that the sweeper will return. The agent's ``presence``
        (version, mode, callback) is written only where it differs from the
        row; ``last_seen_at`` is not written here, nor by the acknowledgement and the
        reports: the API notes it in memory and writes it in batches.
        """
        now = utcnow()
        result = PollResult()
        with self.db.tx() as session:
            if presence is not None and not presence.is_empty():
                result.presence_changed = _note_presence(session, client, presence)
            self._reconcile(session, client, set(held), set(running), now, result)
            if limit <= 0:
                return result
            if session.dirty:
                # A reconcile that put a job back to pending: claim it in this poll.
                session.flush()
            found = (
                session.connection()
                .execute(
                    self.db.for_update(_CLAIM, skip_locked=True),
                    {"claim_client": client.id, "claim_now": now, "claim_limit": limit},
                )
                .mappings()
                .all()
            )
            if not found:
                return result
            target = directory.acl_targets(session, [client.id])[client.id]
            grants = directory.acl_grants(session, [target])
            subjects: dict[int, acl.Subject] = {}
            owners: dict[int, str] = {}
            deadline = now + dt.timedelta(seconds=ack_timeout)
            claimed: list[LiveRow] = []
            for row in found:
                assignment = LiveRow({k[2:]: v for k, v in row.items() if k[:2] == "a_"})
                job = {k[2:]: v for k, v in row.items() if k[:2] == "j_"}
                claimed.append(assignment)
                if job["expires_at"] is not None and job["expires_at"] <= now:
                    self.audit.move(
                        session,
                        assignment,
                        State.EXPIRED,
                        by=SERVER,
                        client=client.name,
                        action="expire",
                        why="expired before dispatch",
                        now=now,
                    )
                    continue
                owner_id = job["owner_id"]
                if owner_id not in subjects:
                    subjects[owner_id] = directory.acl_subject(session, owner_id)
                    owners[owner_id] = (
                        session.connection()
                        .execute(select(_USERS.c.name).where(_USERS.c.id == owner_id))
                        .scalar_one()
                    )
                if not acl.permitted(subjects[owner_id], job["privilege"], target, grants):
                    why = (
                        f"{owners[owner_id]} may not {job['privilege']} on {client.name}"
                        " at dispatch"
                    )
                    self.audit.move(
                        session,
                        assignment,
                        State.DENIED,
                        by=SERVER,
                        client=client.name,
                        action="deny",
                        why=why,
                        now=now,
                    )
                    log_after_commit(
                        session,
                        log,
                        logging.WARNING,
                        "job %s (%s) on %s: denied: %s",
                        assignment.job_id,
                        job["name"],
                        client.name,
                        why,
                    )
                    assignment.reason = why
                    assignment.finished_at = now
                    result.denied += 1
                    continue
                assignment.attempt += 1
                assignment.delivery_id = uuid.uuid4().hex
                assignment.ack_deadline = deadline
                assignment.sent_at = now
                assignment.server_id = self.db.server_id
                self.audit.move(
                    session,
                    assignment,
                    State.SENT,
                    by=client.actor,
                    client=client.name,
                    action="send",
                    why=f"attempt {assignment.attempt}",
                    now=now,
                )
                result.deliveries.append(
                    documents.JobDocument(
                        job_id=assignment.job_id,
                        delivery_id=assignment.delivery_id,
                        attempt=assignment.attempt,
                        name=job["name"],
                        owner=owners[owner_id],
                        client=client.name,
                        privilege=job["privilege"],
                        priority=job["priority"],
                        timeout=job["timeout"],
                        output_limit=job["output_limit"],
                        interpreter=job["interpreter"],
                        created=job["created_at"],
                        script=job["script"],
                        not_before=job["not_before"],
                        expires=job["expires_at"],
                        rerun_on_agent_crash=job["rerun_on_agent_crash"],
                        retry_base=assignment.retry_base,
                    )
                )
            write_back(session, claimed)
        return result

    def _reconcile(
        self,
        session: Session,
        client: Caller,
        held: set[int],
        running: set[int],
        now: dt.datetime,
        result: PollResult,
    ) -> None:
        # Two queries, not one with OR: each is served by an index ((client_id,
        # state) and (job_id, client_id)), so neither walks the host's history.
        base = select(Assignment, Job).join(Job, Job.id == Assignment.job_id)
        rows: list[tuple[Assignment, Job]] = [
            (assignment, job)
            for assignment, job in session.execute(
                self.db.for_update(
                    base.where(
                        Assignment.client_id == client.id,
                        Assignment.state.in_(
                            [State.ACKNOWLEDGED.value, State.RUNNING.value, State.LOST.value]
                        ),
                    )
                )
            )
        ]
        if held or running:
            seen = {assignment.id for assignment, _ in rows}
            rows += [
                (assignment, job)
                for assignment, job in session.execute(
                    self.db.for_update(
                        base.where(
                            Assignment.job_id.in_(held | running),
                            Assignment.client_id == client.id,
                        )
                    )
                )
                if assignment.id not in seen
            ]
        known = set()
        for assignment, job in rows:
            known.add(assignment.job_id)
            state = State(assignment.state)
            claimed = assignment.job_id in held or assignment.job_id in running
            if claimed and state in (State.CANCELLED, State.EXPIRED):
                result.reconcile.append({"job_id": job.id, "action": state.value})
            elif claimed and state == State.DENIED:
                result.reconcile.append({"job_id": job.id, "action": "unknown"})
            elif state == State.LOST and assignment.job_id in running:
                self.audit.move(
                    session,
                    assignment,
                    State.RUNNING,
                    by=client.actor,
                    client=client.name,
                    action="reconcile",
                    why="agent is back",
                    now=now,
                )
            elif state in (State.ACKNOWLEDGED, State.RUNNING) and not claimed:
                # The agent no longer has the job: its spool was lost or wiped.
                gone = "agent no longer holds it"
                if (
                    job.rerun_on_agent_crash
                    and assignment.attempt - assignment.retry_base < job.max_attempts
                ):
                    if state == State.RUNNING:
                        self._server_move(session, assignment, State.LOST, client, gone, now)
                    self._server_move(
                        session, assignment, State.PENDING, client, f"{gone}; rerun", now
                    )
                    result.requeued = True
                else:
                    self._server_move(session, assignment, State.FAILED, client, gone, now)
                    assignment.reason = "agent no longer holds the job"
                    assignment.finished_at = now
        for job_id in sorted((held | running) - known):
            result.reconcile.append({"job_id": job_id, "action": "unknown"})

    def _server_move(
        self,
        session: Session,
        assignment: Assignment,
        to: State,
        client: Caller,
        why: str,
        now: dt.datetime,
    ) -> None:
        self.audit.move(
            session,
            assignment,
            to,
            by=SERVER,
            client=client.name,
            action="reconcile",
            why=why,
            now=now,
        )

    def acknowledge(
        self,
        client: Caller,
        deliveries: Sequence[tuple[int, str]],
        started: Mapping[int, dt.datetime] | None = None,
    ) -> Acknowledged:
        """Mark delivered jobs ``acknowledged``, or ``running`` for those in
        ``started`` (job id: when the agent started it): the agent that starts a
        job at once says so with its acknowledgement instead of a report after it."""
        now = utcnow()
        started = started or {}
        result = Acknowledged()
        with self.db.tx() as session:
            held = self._held(session, client, [job_id for job_id, _ in deliveries])
            for job_id, delivery_id in deliveries:
                assignment = held.get(job_id)
                if assignment is None or assignment.delivery_id != delivery_id:
                    continue
                state = State(assignment.state)
                if state in (State.SENT, State.PENDING):
                    if job_id in started:
                        self.audit.move(
                            session,
                            assignment,
                            State.RUNNING,
                            by=client.actor,
                            client=client.name,
                            action="acknowledge",
                            why="started at once",
                            now=now,
                        )
                        _clear_for_run(assignment, started[job_id])
                        result.started.append(job_id)
                    else:
                        self.audit.move(
                            session,
                            assignment,
                            State.ACKNOWLEDGED,
                            by=client.actor,
                            client=client.name,
                            action="acknowledge",
                            now=now,
                        )
                    assignment.acknowledged_at = now
                    result.kept.append(job_id)
                elif state in (State.ACKNOWLEDGED, State.RUNNING, State.LOST) or state in FINAL:
                    result.kept.append(job_id)  # a repeated acknowledgement changes nothing
            write_back(session, held.values())
        return result

    def report(self, client: Caller, report: documents.StatusReport) -> str:
        """Apply a status report; returns ``applied``, ``duplicate`` or ``ignored``."""
        outcome = self.report_many(client, [report])[0]
        if isinstance(outcome, ScireError):
            raise outcome
        return outcome

    def report_many(
        self, client: Caller, reports: Sequence[documents.StatusReport]
    ) -> list[str | ScireError]:
        """Apply several status reports in one transaction, in order: for each,
        ``applied``, ``duplicate`` or ``ignored``, or the error that refused it
        (``NotHeld``, ``IllegalTransition``: raised before it wrote anything, so
        the others still apply)."""
        now = utcnow()
        outcomes: list[str | ScireError] = []
        with self.db.tx() as session:
            held = self._held(session, client, [report.job_id for report in reports])
            for report in reports:
                try:
                    outcomes.append(
                        self._apply(session, client, held.get(report.job_id), report, now)
                    )
                except (NotHeld, IllegalTransition) as exc:
                    outcomes.append(exc)
            write_back(session, held.values())
        return outcomes

    def _held(self, session: Session, client: Caller, job_ids: Sequence[int]) -> dict[int, LiveRow]:
        """The client's assignments of these jobs, locked, by job id: one Core
        query, no ORM objects (the agent's hot path); ``write_back`` stores
        what was set on them."""
        if not job_ids:
            return {}
        rows = session.connection().execute(
            self.db.for_update(
                select(*_LIVE_COLUMNS).where(
                    _ASSIGNMENTS.c.client_id == client.id, _ASSIGNMENTS.c.job_id.in_(set(job_ids))
                )
            )
        )
        return {row.job_id: LiveRow(dict(row._mapping)) for row in rows}

    def _apply(
        self,
        session: Session,
        client: Caller,
        assignment: LiveRow | None,
        report: documents.StatusReport,
        now: dt.datetime,
    ) -> str:
        new = State(report.state)
        if assignment is None or assignment.delivery_id is None:
            raise NotHeld(
                f"client {client.name} holds no job {report.job_id}", job_id=report.job_id
            )
        old = State(assignment.state)
        if old == new == State.RUNNING and report.output is not None:
            return _live_output(assignment, report)
        if old == State.CANCELLED and new != State.RUNNING and report.output is not None:
            # Cancelled here first: the agent's last report still brings what
            # the job wrote before it was stopped; the state stays cancelled.
            _live_output(assignment, report)
        if old == new:
            return DUPLICATE
        if old in (State.CANCELLED, State.EXPIRED, State.DENIED) or (
            old in FINAL and new == State.RUNNING
        ):
            self.audit.write(
                session,
                client.actor,
                "late_report",
                job_id=report.job_id,
                client=client.name,
                old=old.value,
                new=new.value,
                detail=f"report of {new.value} after {old.value}; not applied",
                at=now,
            )
            log_after_commit(
                session,
                log,
                logging.INFO,
                "job %s on %s: late report %s ignored, stays %s",
                report.job_id,
                client.name,
                new.value,
                old.value,
            )
            return IGNORED
        if not allowed(old, new):
            raise IllegalTransition(
                f"job {report.job_id} on {client.name} is {old.value}; cannot become {new.value}",
                job_id=report.job_id,
            )
        self.audit.move(
            session,
            assignment,
            new,
            by=client.actor,
            client=client.name,
            action="report",
            why=report.reason,
            now=now,
        )
        if new == State.RUNNING:
            assignment.acknowledged_at = assignment.acknowledged_at or now
            _clear_for_run(assignment, report.started or now)
            if report.output is not None:
                _live_output(assignment, report)
        else:
            assignment.started_at = report.started or assignment.started_at
            assignment.finished_at = report.finished or now
            assignment.exit_code = report.exit_code
            assignment.output = report.output
            assignment.output_truncated = report.truncated
            assignment.reason = report.reason
        return APPLIED

    def next_start(self, client: Caller) -> dt.datetime | None:
        """When the client's first pending job that may not start yet comes due
        (None: it has none); read once a poll found nothing (the poll cache)."""
        with self.db.tx(write=False) as session:
            first: dt.datetime | None = session.scalar(
                select(sa.func.min(Job.not_before))
                .select_from(Assignment)
                .join(Job, Job.id == Assignment.job_id)
                .where(Assignment.client_id == client.id, Assignment.state == State.PENDING.value)
            )
            return first


def _clear_for_run(assignment: LiveRow, started: dt.datetime) -> None:
    """A run begins: what an earlier attempt left goes, this run's output starts here."""
    assignment.started_at = started
    assignment.output = None
    assignment.output_truncated = False


def _live_output(assignment: LiveRow, report: documents.StatusReport) -> str:
    """Keep a running job's output so far when it says more than what is stored.

    A live report carries the whole output from its start (up to the cap), not a
    delta: a resent or late report holds a prefix of what is stored already and
    changes nothing, so no text is ever stored twice.
    """
    assert report.output is not None
    if assignment.output is not None and (
        len(report.output) < len(assignment.output)
        or (
            len(report.output) == len(assignment.output)
            and report.truncated == bool(assignment.output_truncated)
        )
    ):
        return DUPLICATE
    assignment.output = report.output
    assignment.output_truncated = report.truncated
    return APPLIED


def _note_presence(session: Session, client: Caller, presence: AgentPresence) -> bool:
    """Write what the agent said of itself where it differs from the row (one
    conditional update: an unchanged presence writes nothing); True if it changed."""
    values: dict[str, str | None] = {}
    if presence.version is not None:
        values["agent_version"] = presence.version
    if presence.mode is not None:
        values["agent_mode"] = presence.mode
    if presence.callback is not None:
        values["callback_address"] = presence.callback or None
    columns = {name: getattr(Client, name) for name in values}
    differs = sa.or_(
        *(
            sa.or_(columns[name].is_(None), columns[name] != value)
            if value is not None
            else columns[name].is_not(None)
            for name, value in values.items()
        )
    )
    changed: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Client).where(Client.id == client.id, differs).values(**values)
    )
    return bool(changed.rowcount)
