"""Schedules: made by ``job submit --at/--every/--cron``, listed, paused,
resumed, deleted, and their runs made when due.

Each run of a schedule is a job of its own, made by the same code as a
submission (``jobs.resolve_targets``, ``jobs.insert_job``, ``jobs.fan_out``)
and linked back by ``jobs.schedule_id`` and ``jobs.due_at``. A run is made
exactly once however many daemons share the database:

* the due schedule's row is locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
  SQLite serializes writers) and its due time read again under the lock;
* ``next_due_at`` is advanced with a conditional update (``WHERE next_due_at =``
  the value read), so a daemon that lost the race changes nothing;
* the run's insert is insert-if-absent on the unique (schedule_id, due_at).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scire_schema.protocol import CatchUp, ScheduleKind
from scire_server import recurrence
from scire_server.exceptions import Conflict, NotFound
from scire_server.models import Assignment, Event, Job, Schedule, User
from scire_server.states import FINAL, ScheduleState, job_summary
from scire_server.store import jobs
from scire_server.store.audit import AuditTrail
from scire_server.store.database import Database, log_after_commit, row_dict, utcnow
from scire_server.store.records import SERVER, Caller, JobSpec, ScheduleResult

log = logging.getLogger(__name__)

SCHEDULE_FIELDS = (
    "id",
    "name",
    "kind",
    "expression",
    "timezone",
    "allow_overlap",
    "catch_up",
    "state",
    "next_due_at",
    "last_due_at",
    "created_at",
    "updated_at",
)
#: Due schedules one tick handles; the rest wait for the next tick.
DUE_PER_TICK = 100
#: Runs ``schedule show`` lists, newest first.
RECENT_RUNS = 10


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC)


def _naive(value: dt.datetime | None) -> dt.datetime | None:
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value is not None else None


def recurrence_of(schedule: Schedule) -> recurrence.Recurrence:
    """The stored schedule's recurrence (``every`` counts from its creation)."""
    return recurrence.Recurrence(
        ScheduleKind(schedule.kind),
        schedule.expression,
        schedule.timezone,
        _aware(schedule.created_at),
    )


def stored_spec(schedule: Schedule) -> tuple[dict[str, Any], list[str], list[str]]:
    """The job definition, hosts and groups a schedule's runs are made of."""
    spec: dict[str, Any] = dict(schedule.spec)
    return (
        dict(spec.get("job") or {}),
        list(spec.get("hosts") or []),
        list(spec.get("groups") or []),
    )


def describe(schedule: Schedule) -> str:
    return recurrence_of(schedule).describe()


class Schedules:
    """Schedules and the runs they make."""

    def __init__(self, database: Database, audit: AuditTrail) -> None:
        self.db = database
        self.audit = audit

    def create(
        self,
        owner: Caller,
        spec: JobSpec,
        hosts: Sequence[str],
        groups: Sequence[str],
        when: recurrence.Recurrence,
        allow_overlap: bool = False,
        catch_up: CatchUp = CatchUp.ONCE,
        request_key: str | None = None,
    ) -> ScheduleResult:
        """Write a schedule whose runs are jobs of ``spec`` for these targets.

        The targets are checked now as a submission checks them (an unknown
        host is ``NotFound``, none permitted ``Forbidden``), so the operator
        learns at once; every run checks them again. A ``request_key`` the
        owner used before answers with that schedule (``repeated``).
        """
        now = _naive(when.anchor)
        assert now is not None
        with self.db.tx() as session:
            if request_key is not None:
                first = self._by_request_key(session, owner, request_key)
                if first is not None:
                    return first
            accepted, refused = jobs.resolve_targets(session, owner, spec.privilege, hosts, groups)
            if not accepted:
                raise jobs.no_target_error(owner.name, spec.privilege, refused)
            schedule = Schedule(
                name=spec.name,
                owner_id=owner.id,
                kind=when.kind.value,
                expression=when.expression,
                timezone=when.timezone,
                spec={"job": _spec_json(spec), "hosts": list(hosts), "groups": list(groups)},
                allow_overlap=allow_overlap,
                catch_up=CatchUp(catch_up).value,
                state=ScheduleState.ACTIVE.value,
                next_due_at=_naive(when.first()),
                last_due_at=None,
                created_at=now,
                updated_at=now,
                request_key=request_key,
            )
            if not jobs.insert_job(session, schedule):
                first = (
                    self._by_request_key(session, owner, request_key)
                    if request_key is not None
                    else None
                )
                if first is None:
                    raise Conflict(f"schedule {spec.name} conflicts with an existing schedule")
                return first
            self.audit.write(
                session,
                owner.actor,
                "schedule_created",
                detail=f"schedule {schedule.id} ({schedule.name}): {when.describe()}, "
                f"catch-up {schedule.catch_up}"
                + (", overlap allowed" if allow_overlap else "")
                + f"; next run {schedule.next_due_at:%Y-%m-%d %H:%M:%S} UTC",
                at=now,
            )
            log_after_commit(
                session,
                log,
                logging.INFO,
                "schedule %s (%s) created by %s: %s, next run %s UTC",
                schedule.id,
                schedule.name,
                owner.name,
                when.describe(),
                schedule.next_due_at,
                extra={"schedule": schedule.id, "user": owner.name},
            )
            return ScheduleResult(
                schedule.id, schedule.next_due_at, [c for _, c in accepted], refused
            )

    def _by_request_key(
        self, session: Session, owner: Caller, request_key: str
    ) -> ScheduleResult | None:
        schedule = session.scalars(
            select(Schedule).where(
                Schedule.owner_id == owner.id, Schedule.request_key == request_key
            )
        ).first()
        if schedule is None:
            return None
        log_after_commit(
            session,
            log,
            logging.INFO,
            "schedule %s: submission with request key %s repeated by %s",
            schedule.id,
            request_key,
            owner.name,
        )
        return ScheduleResult(schedule.id, schedule.next_due_at, [], [], repeated=True)

    def listing(self, caller: Caller, include_all: bool = False) -> list[dict[str, Any]]:
        """The schedules the caller may see (an admin sees all), oldest first;
        deleted ones only with ``include_all``."""
        with self.db.tx(write=False) as session:
            query = (
                select(Schedule, User.name)
                .join(User, User.id == Schedule.owner_id)
                .order_by(Schedule.id)
            )
            if not caller.is_admin:
                query = query.where(Schedule.owner_id == caller.id)
            if not include_all:
                query = query.where(Schedule.state != ScheduleState.DELETED.value)
            runs = dict(
                session.execute(
                    select(Job.schedule_id, sa.func.count())
                    .where(Job.schedule_id.is_not(None))
                    .group_by(Job.schedule_id)
                ).all()
            )
            return [
                row_dict(schedule, *SCHEDULE_FIELDS)
                | {"owner": owner, "when": describe(schedule), "runs": runs.get(schedule.id, 0)}
                for schedule, owner in session.execute(query).all()
            ]

    def detail(self, caller: Caller, schedule_id: int) -> dict[str, Any]:
        """One schedule the caller may see, with its job definition, its targets
        and its newest runs (each with its summary and skipped hosts)."""
        with self.db.tx(write=False) as session:
            schedule = _visible(session, caller, schedule_id)
            owner = session.get(User, schedule.owner_id)
            runs = session.scalars(
                select(Job)
                .where(Job.schedule_id == schedule_id)
                .order_by(Job.due_at.desc(), Job.id.desc())
                .limit(RECENT_RUNS)
            ).all()
            ids = [job.id for job in runs]
            counts: dict[int, dict[str, int]] = {}
            for job_id, state, n in session.execute(
                select(Assignment.job_id, Assignment.state, sa.func.count())
                .where(Assignment.job_id.in_(ids))
                .group_by(Assignment.job_id, Assignment.state)
            ):
                counts.setdefault(job_id, {})[state] = n
            skipped: dict[int, list[str]] = {}
            for event_job, detail in session.execute(
                select(Event.job_id, Event.detail)
                .where(Event.job_id.in_(ids), Event.action == jobs.RUN_SKIPPED)
                .order_by(Event.id)
            ):
                if event_job is not None and detail:
                    skipped.setdefault(event_job, []).append(detail)
            total = session.scalar(
                select(sa.func.count()).select_from(Job).where(Job.schedule_id == schedule_id)
            )
            job, hosts, groups = stored_spec(schedule)
            script = job.pop("script", "")
            return row_dict(schedule, *SCHEDULE_FIELDS) | {
                "owner": owner.name if owner else "?",
                "when": describe(schedule),
                "hosts": hosts,
                "groups": groups,
                "job": job,
                "script": script,
                "run_count": total or 0,
                "runs": [
                    {
                        "job_id": run.id,
                        "due_at": run.due_at,
                        "created_at": run.created_at,
                        "state": job_summary(counts.get(run.id, {})),
                        "states": counts.get(run.id, {}),
                        "skipped": skipped.get(run.id, []),
                    }
                    for run in runs
                ],
            }

    def pause(self, caller: Caller, schedule_id: int) -> dict[str, Any]:
        """Stop making runs until resumed (runs already made go on)."""
        return self._change(caller, schedule_id, ScheduleState.PAUSED)

    def resume(self, caller: Caller, schedule_id: int) -> dict[str, Any]:
        """Make runs again from the next slot on; the slots while paused are not runs."""
        return self._change(caller, schedule_id, ScheduleState.ACTIVE)

    def delete(self, caller: Caller, schedule_id: int) -> dict[str, Any]:
        """Make no run ever again. Runs already made go on (``job cancel`` stops
        them); the row stays, because its runs name it."""
        return self._change(caller, schedule_id, ScheduleState.DELETED)

    def _change(self, caller: Caller, schedule_id: int, to: ScheduleState) -> dict[str, Any]:
        now = utcnow()
        with self.db.tx() as session:
            schedule = _visible(session, caller, schedule_id)
            old = ScheduleState(schedule.state)
            if old == to:
                return {"id": schedule.id, "state": old.value, "next_due_at": schedule.next_due_at}
            if old == ScheduleState.DELETED or (
                old == ScheduleState.FINISHED and to != ScheduleState.DELETED
            ):
                raise Conflict(f"schedule {schedule_id} is {old.value}; it cannot be {to.value}")
            if to == ScheduleState.ACTIVE:
                when = recurrence_of(schedule)
                if when.kind != ScheduleKind.AT:
                    schedule.next_due_at = _naive(when.at_or_after(_aware(now)))
            elif to == ScheduleState.DELETED:
                schedule.next_due_at = None
            schedule.state = to.value
            schedule.updated_at = now
            action = {
                ScheduleState.PAUSED: "schedule_paused",
                ScheduleState.ACTIVE: "schedule_resumed",
                ScheduleState.DELETED: "schedule_deleted",
            }[to]
            self.audit.write(
                session,
                caller.actor,
                action,
                old=old.value,
                new=to.value,
                detail=f"schedule {schedule.id} ({schedule.name})",
                at=now,
            )
            log_after_commit(
                session,
                log,
                logging.INFO,
                "schedule %s (%s): %s -> %s (%s)",
                schedule.id,
                schedule.name,
                old.value,
                to.value,
                caller.actor,
                extra={"schedule": schedule.id},
            )
            return {"id": schedule.id, "state": to.value, "next_due_at": schedule.next_due_at}

    # --- the timed task ----------------------------------------------------------------

    def materialize(self, now: dt.datetime | None = None, grace: float = 10.0) -> set[str]:
        """Make the runs that are due at ``now`` (default: the clock) for every
        active schedule, each schedule in a transaction of its own; the names of
        the clients that got new pending work, once every transaction has
        committed. ``grace``: how late a slot may be and still run under
        catch-up ``skip``."""
        now = now or utcnow()
        with self.db.tx(write=False) as session:
            due = session.scalars(
                select(Schedule.id)
                .where(
                    Schedule.state == ScheduleState.ACTIVE.value,
                    Schedule.next_due_at <= now,
                )
                .order_by(Schedule.next_due_at)
                .limit(DUE_PER_TICK)
            ).all()
        clients: set[str] = set()
        for schedule_id in due:
            clients |= self._materialize_one(schedule_id, now, grace)
        return clients

    def _materialize_one(self, schedule_id: int, now: dt.datetime, grace: float) -> set[str]:
        with self.db.tx() as session:
            query = select(Schedule).where(
                Schedule.id == schedule_id,
                Schedule.state == ScheduleState.ACTIVE.value,
                Schedule.next_due_at <= now,
            )
            if self.db.postgres:
                # Another daemon making this schedule's runs holds the row: it
                # is handling them, and its next_due_at will say so.
                query = query.with_for_update(skip_locked=True)
            schedule = session.scalars(query).first()
            if schedule is None or schedule.next_due_at is None:
                return set()
            was_due = schedule.next_due_at
            when = recurrence_of(schedule)
            plan = recurrence.plan(
                when, _aware(was_due), _aware(now), CatchUp(schedule.catch_up), grace
            )
            next_due = _naive(plan.next_due)
            last_due = _naive(plan.runs[-1]) if plan.runs else schedule.last_due_at
            claimed: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.next_due_at == was_due)
                .values(
                    next_due_at=next_due,
                    last_due_at=last_due,
                    state=(
                        ScheduleState.ACTIVE.value
                        if next_due is not None
                        else ScheduleState.FINISHED.value
                    ),
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != 1:
                return set()  # another daemon advanced it first
            owner = session.get(User, schedule.owner_id)
            assert owner is not None  # schedules.owner_id is a foreign key
            caller = Caller("user", owner.id, owner.name, owner.is_admin)
            clients: set[str] = set()
            for slot in plan.runs:
                clients |= self._make_run(session, schedule, caller, _naive(slot) or now, now)
            if plan.skipped:
                log_after_commit(
                    session,
                    log,
                    logging.INFO,
                    "schedule %s (%s): %d missed slot(s) passed over (catch-up %s)",
                    schedule.id,
                    schedule.name,
                    plan.skipped,
                    schedule.catch_up,
                    extra={"schedule": schedule.id},
                )
            if next_due is None:
                log_after_commit(
                    session,
                    log,
                    logging.INFO,
                    "schedule %s (%s) finished",
                    schedule.id,
                    schedule.name,
                )
            return clients

    def _make_run(
        self,
        session: Session,
        schedule: Schedule,
        owner: Caller,
        due_at: dt.datetime,
        now: dt.datetime,
    ) -> set[str]:
        """One run of ``schedule`` for the slot ``due_at``, unless it exists;
        the names of the clients it is pending for."""
        values, hosts, groups = stored_spec(schedule)
        spec = JobSpec(**values)
        accepted, refused = jobs.resolve_targets(
            session, owner, spec.privilege, hosts, groups, missing_refused=True
        )
        busy: dict[int, int] = {}
        if not schedule.allow_overlap and accepted:
            busy = {
                client_id: job_id
                for client_id, job_id in session.execute(
                    select(Assignment.client_id, Assignment.job_id)
                    .join(Job, Job.id == Assignment.job_id)
                    .where(
                        Job.schedule_id == schedule.id,
                        Assignment.client_id.in_([cid for cid, _ in accepted]),
                        Assignment.state.not_in([s.value for s in FINAL]),
                    )
                )
            }
        job = Job(
            owner_id=owner.id,
            created_at=now,
            schedule_id=schedule.id,
            due_at=due_at,
            **vars(spec),
        )
        if not jobs.insert_job(session, job):
            log_after_commit(
                session,
                log,
                logging.INFO,
                "schedule %s: the run due at %s exists already",
                schedule.id,
                due_at,
            )
            return set()
        taking = [(cid, name) for cid, name in accepted if cid not in busy]
        detail = f"run of schedule {schedule.id} due at {due_at:%Y-%m-%d %H:%M:%S} UTC"
        jobs.fan_out(session, self.audit, job, taking, refused, SERVER, now, detail=detail)
        names = {cid: name for cid, name in accepted}
        for cid, previous in sorted(busy.items(), key=lambda kv: names[kv[0]]):
            self.audit.write(
                session,
                SERVER,
                jobs.RUN_SKIPPED,
                job_id=job.id,
                client=names[cid],
                detail=f"{names[cid]} (run {previous} of this schedule is still active there)",
                at=now,
            )
        self.audit.write(
            session,
            SERVER,
            "run_created",
            job_id=job.id,
            detail=f"{detail}: {len(taking)} host(s), {len(busy)} skipped, {len(refused)} refused",
            at=now,
        )
        log_after_commit(
            session,
            log,
            logging.INFO,
            "schedule %s (%s): run %s due at %s for %d client(s), %d skipped, %d refused",
            schedule.id,
            schedule.name,
            job.id,
            due_at,
            len(taking),
            len(busy),
            len(refused),
            extra={"schedule": schedule.id, "job": job.id},
        )
        return {name for _, name in taking}


def _spec_json(spec: JobSpec) -> dict[str, Any]:
    """The job definition each run copies; a run has no not-before or expiry."""
    values = dict(vars(spec))
    values["not_before"] = None
    values["expires_at"] = None
    return values


def _visible(session: Session, caller: Caller, schedule_id: int) -> Schedule:
    """The schedule if the caller owns it or is an administrator; otherwise, as
    for jobs, ``NotFound``, so a user learns nothing of others' schedules."""
    schedule = session.get(Schedule, schedule_id)
    if schedule is None or (not caller.is_admin and schedule.owner_id != caller.id):
        raise NotFound(f"no schedule {schedule_id}")
    return schedule
