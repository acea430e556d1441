"""What the sweeper writes: leases that ran out, the takeover of daemons
whose heartbeat went stale, expired jobs, lost runs, and retention. Each
sweep is safe on several daemons at once: rows another daemon holds locked
are skipped (it is handling them), and a takeover is a conditional update."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from scire_server.models import Assignment, Client, Event, Job, Server
from scire_server.states import FINAL, ClientStatus, ServerState, State
from scire_server.store.audit import AuditTrail
from scire_server.store.database import Database, utcnow
from scire_server.store.records import SERVER, Repairs, Takeover

#: Jobs ``purge_jobs`` removes per transaction: a large purge never holds
#: SQLite's write lock (or PostgreSQL's row locks) for long.
JOB_PURGE_BATCH = 500
_FINAL_STATES = sorted(s.value for s in FINAL)


class Sweeps:
    """The server's own repairs of assignments, and the purge of old results."""

    def __init__(self, database: Database, audit: AuditTrail) -> None:
        self.db = database
        self.audit = audit

    def return_leases(
        self, now: dt.datetime | None = None, own_previous_life: bool = False
    ) -> Repairs:
        """Return sent assignments whose lease ran out to pending (or fail them as
        undeliverable after the job's attempts); ``due`` names the clients whose
        work went back to pending.

        With ``own_previous_life`` the leases this daemon held before a restart
        go back too, before their deadline, unless they were the job's last
        attempt.
        """
        now = now or utcnow()
        with self.db.tx() as session:
            lease_over = Assignment.ack_deadline <= now
            which = (
                sa.or_(lease_over, Assignment.server_id == self.db.server_id)
                if own_previous_life
                else lease_over
            )
            return self._return_leases(session, which, now)

    def take_over(self, stale_after: int, now: dt.datetime | None = None) -> list[Takeover]:
        """Mark every *other* daemon whose row says ``running`` but whose heartbeat
        is older than ``stale_after`` seconds ``dead``, and return its leases
        (the rules of a restart's own leases: a last attempt waits for its
        deadline). Each takeover is one transaction with its ``takeover`` audit
        row; the conditional update lets only one of several survivors take
        over a given daemon."""
        now = now or utcnow()
        bound = now - dt.timedelta(seconds=stale_after)
        stale = (
            Server.state == ServerState.RUNNING.value,
            Server.heartbeat_at < bound,
            Server.id != self.db.server_id,
        )
        with self.db.tx(write=False) as session:
            candidates = session.execute(
                select(Server.id, Server.instance_key, Server.heartbeat_at).where(*stale)
            ).all()
        done: list[Takeover] = []
        for server_id, instance_key, heartbeat_at in candidates:
            with self.db.tx() as session:
                won: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                    update(Server)
                    .where(Server.id == server_id, *stale)
                    .values(state=ServerState.DEAD.value)
                )
                if won.rowcount != 1:
                    continue  # another survivor took it over, or it woke up
                repairs = self._return_leases(session, Assignment.server_id == server_id, now)
                silent = int((now - heartbeat_at).total_seconds())
                detail = (
                    f"{self.db.server_name} took over {instance_key} (no heartbeat for "
                    f"{silent} s): leases returned={repairs['returned']}, "
                    f"undeliverable={repairs['undeliverable']}"
                )
                self.audit.write(session, SERVER, "takeover", detail=detail, at=now)
                done.append(Takeover(instance_key, silent, repairs, detail))
        return done

    def _return_leases(self, session: Session, which: Any, now: dt.datetime) -> Repairs:
        """Return the ``sent`` assignments ``which`` selects to pending, or fail
        them as undeliverable after the job's attempts; a last attempt whose
        deadline has not passed is left for its agent to acknowledge."""
        counts = {"returned": 0, "undeliverable": 0}
        due: set[str] = set()
        query = (
            select(Assignment, Job, Client.name)
            .join(Job, Job.id == Assignment.job_id)
            .join(Client, Client.id == Assignment.client_id)
            .where(Assignment.state == State.SENT.value, which)
        )
        for assignment, job, cname in session.execute(
            self.db.for_update(query, skip_locked=True)
        ).all():
            deadline_passed = assignment.ack_deadline is not None and assignment.ack_deadline <= now
            # An operator's retry gives a host the job's attempts afresh.
            spent = assignment.attempt - assignment.retry_base
            if spent >= job.max_attempts and not deadline_passed:
                # A last attempt from a daemon's previous life: its agent may
                # still acknowledge it; the lease decides when it runs out.
                continue
            if spent >= job.max_attempts:
                self.audit.move(
                    session,
                    assignment,
                    State.FAILED,
                    by=SERVER,
                    client=cname,
                    action="lease_expired",
                    why=f"undeliverable after {assignment.attempt} attempt(s)",
                    now=now,
                )
                assignment.reason = "undeliverable"
                assignment.finished_at = now
                counts["undeliverable"] += 1
            else:
                self.audit.move(
                    session,
                    assignment,
                    State.PENDING,
                    by=SERVER,
                    client=cname,
                    action="lease_expired",
                    why=f"no acknowledgement for attempt {assignment.attempt}",
                    now=now,
                )
                counts["returned"] += 1
                due.add(cname)
            assignment.ack_deadline = None
        return Repairs(counts, frozenset(due))

    def expire(self, now: dt.datetime | None = None) -> int:
        """Expire the not-yet-running assignments of jobs past their expiry (a
        running one is left to finish); returns how many."""
        now = now or utcnow()
        with self.db.tx() as session:
            rows = session.execute(
                self.db.for_update(
                    select(Assignment, Client.name)
                    .join(Job, Job.id == Assignment.job_id)
                    .join(Client, Client.id == Assignment.client_id)
                    .where(
                        Job.expires_at.is_not(None),
                        Job.expires_at <= now,
                        Assignment.state.in_(
                            [State.PENDING.value, State.SENT.value, State.ACKNOWLEDGED.value]
                        ),
                    ),
                    skip_locked=True,
                )
            ).all()
            for assignment, cname in rows:
                self.audit.move(
                    session,
                    assignment,
                    State.EXPIRED,
                    by=SERVER,
                    client=cname,
                    action="expire",
                    now=now,
                )
                assignment.finished_at = now
                assignment.reason = "expired before it started"
            return len(rows)

    def mark_lost(self, lost_after: int, now: dt.datetime | None = None) -> Repairs:
        """Mark running assignments ``lost`` whose agent has not called for
        ``lost_after`` seconds and whose run has not changed for as long; those whose job allows a rerun go back to pending
        (``due`` names their clients)."""
        now = now or utcnow()
        bound = now - dt.timedelta(seconds=lost_after)
        counts = {"lost": 0, "requeued": 0}
        due: set[str] = set()
        with self.db.tx() as session:
            rows = session.execute(
                self.db.for_update(
                    select(Assignment, Job, Client.name)
                    .join(Job, Job.id == Assignment.job_id)
                    .join(Client, Client.id == Assignment.client_id)
                    .where(
                        Assignment.state == State.RUNNING.value,
                        sa.or_(Client.last_seen_at.is_(None), Client.last_seen_at < bound),
                        # Last-seen times reach the database in batches, the calls
                        # that start a run do not write them: a run that began (or
                        # changed) within lost_after is not lost.
                        Assignment.updated_at < bound,
                    ),
                    skip_locked=True,
                )
            ).all()
            for assignment, job, cname in rows:
                self.audit.move(
                    session,
                    assignment,
                    State.LOST,
                    by=SERVER,
                    client=cname,
                    action="lost",
                    why=f"no word from the agent for {lost_after} s",
                    now=now,
                )
                counts["lost"] += 1
                if (
                    job.rerun_on_agent_crash
                    and assignment.attempt - assignment.retry_base < job.max_attempts
                ):
                    self.audit.move(
                        session,
                        assignment,
                        State.PENDING,
                        by=SERVER,
                        client=cname,
                        action="retry",
                        why="job allows a rerun",
                        now=now,
                    )
                    counts["requeued"] += 1
                    due.add(cname)
            return Repairs(counts, frozenset(due))

    def clients_with_due_work(self, now: dt.datetime | None = None) -> set[str]:
        """The accepted clients that have a pending assignment their next poll
        would claim (``not_before`` passed): whom start-up recovery announces."""
        now = now or utcnow()
        with self.db.tx(write=False) as session:
            return set(
                session.scalars(
                    select(Client.name)
                    .distinct()
                    .join(Assignment, Assignment.client_id == Client.id)
                    .join(Job, Job.id == Assignment.job_id)
                    .where(
                        Client.status == ClientStatus.ACCEPTED.value,
                        Assignment.state == State.PENDING.value,
                        sa.or_(Job.not_before.is_(None), Job.not_before <= now),
                    )
                )
            )

    def purge(self, older_than_days: int) -> dict[str, int]:
        """Clear the output of assignments finished before the bound and delete
        older audit rows; jobs and assignments themselves are kept."""
        bound = utcnow() - dt.timedelta(days=older_than_days)
        with self.db.tx() as session:
            outputs: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Assignment)
                .where(
                    Assignment.state.in_([s.value for s in FINAL]),
                    Assignment.finished_at < bound,
                    Assignment.output.is_not(None),
                )
                .values(output=None)
            )
            events: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                sa.delete(Event).where(Event.at < bound)
            )
            return {"outputs": outputs.rowcount or 0, "events": events.rowcount or 0}

    def purge_jobs(
        self,
        older_than_days: int,
        batch: int = JOB_PURGE_BATCH,
        now: dt.datetime | None = None,
    ) -> dict[str, int]:
        """Delete the jobs whose every assignment is final and whose last finish
        (the newest ``finished_at`` of their assignments, ``created_at`` for a
        job without any) is older than the bound, with their assignments and
        their audit rows; ``batch`` jobs per transaction. A job with any
        assignment that is not final is never removed, however old. Returns
        the rows removed (``jobs``, ``assignments``, ``events``) and the
        ``batches`` (transactions) that removed them.

        The candidates are read first without the write lock; each batch's
        transaction checks them again (on PostgreSQL after locking the job and
        assignment rows, skipping a job any of whose rows another transaction
        holds: it is changing it). A removed run of a schedule only leaves its
        slot, which the schedule has passed; a removed job's request key may be
        used again."""
        now = now or utcnow()
        bound = now - dt.timedelta(days=older_than_days)
        counts = {"jobs": 0, "assignments": 0, "events": 0, "batches": 0}
        after = 0
        while True:
            with self.db.tx(write=False) as session:
                candidates = list(
                    session.scalars(_finished_jobs(bound).where(Job.id > after).limit(batch))
                )
            if not candidates:
                return counts
            after = candidates[-1]
            with self.db.tx() as session:
                removed = self._remove_jobs(session, candidates, bound)
            if removed["jobs"]:
                counts["batches"] += 1
                for key, value in removed.items():
                    counts[key] += value
            if len(candidates) < batch:
                return counts

    def _remove_jobs(
        self, session: Session, candidates: list[int], bound: dt.datetime
    ) -> dict[str, int]:
        """Delete those of ``candidates`` that are still finished before the
        bound (see ``purge_jobs``), in the caller's transaction."""
        held = candidates
        locked: Counter[int] | None = None
        if self.db.postgres:
            # Locking the job rows also holds off a new assignment of theirs
            # (its foreign key check waits for the job row).
            held = list(
                session.scalars(
                    select(Job.id)
                    .where(Job.id.in_(candidates))
                    .order_by(Job.id)
                    .with_for_update(skip_locked=True)
                )
            )
            locked = Counter(
                session.scalars(
                    select(Assignment.job_id)
                    .where(Assignment.job_id.in_(held))
                    .order_by(Assignment.id)
                    .with_for_update(skip_locked=True)
                )
            )
        if not held:
            return {"jobs": 0, "assignments": 0, "events": 0}
        # Checked again now that nothing can change them: a new statement sees
        # what committed meanwhile (an operator's retry of a failed host).
        ids = [
            job_id
            for job_id, assignments in session.execute(
                _finished_jobs(bound)
                .add_columns(sa.func.count(Assignment.id))
                .where(Job.id.in_(held))
            )
            if locked is None or locked[job_id] == assignments
        ]
        if not ids:
            return {"jobs": 0, "assignments": 0, "events": 0}
        removed = {}
        for key, statement in (
            ("events", sa.delete(Event).where(Event.job_id.in_(ids))),
            ("assignments", sa.delete(Assignment).where(Assignment.job_id.in_(ids))),
            ("jobs", sa.delete(Job).where(Job.id.in_(ids))),
        ):
            result: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                statement.execution_options(synchronize_session=False)
            )
            removed[key] = result.rowcount or 0
        return removed


def _finished_jobs(bound: dt.datetime) -> Select[int]:
    """The ids of the jobs, oldest first, whose assignments are all final and
    whose last finish is before ``bound``: the newest ``finished_at`` of their
    assignments (``updated_at`` for one without: the change that made it
    final), ``created_at`` for a job without any."""
    not_final = sa.case((Assignment.state.not_in(_FINAL_STATES), 1), else_=0)
    last_finish = sa.func.coalesce(
        sa.func.max(sa.func.coalesce(Assignment.finished_at, Assignment.updated_at)),
        Job.created_at,
    )
    return (
        select(Job.id)
        .outerjoin(Assignment, Assignment.job_id == Job.id)
        # A job finishes after it was made: the bound leaves the new ones out early.
        .where(Job.created_at < bound)
        .group_by(Job.id, Job.created_at)
        .having(sa.func.sum(not_final) == 0, last_finish < bound)
        .order_by(Job.id)
    )
