"""Jobs: submission (targets resolved, checked and fanned out into assignments),
listing, detail and cancellation."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scire_schema import logformat
from scire_server import acl
from scire_server.exceptions import Conflict, Forbidden, InvalidArgument, NotFound
from scire_server.models import Assignment, Client, Event, Job, Schedule, User
from scire_server.states import FINAL, RETRYABLE, ClientStatus, State, job_summary
from scire_server.store import directory
from scire_server.store.audit import AuditTrail
from scire_server.store.database import Database, log_after_commit, row_dict, utcnow
from scire_server.store.records import Caller, JobSpec, RetryResult, SubmitResult

log = logging.getLogger(__name__)

#: The audit action of an operator's ``job retry`` of one host; its detail
#: keeps the previous attempt's end and output (``PREVIOUS_OUTPUT_LIMIT``).
RETRY = "retry"
#: Characters of a retried attempt's output its ``retry`` audit row keeps (the
#: end of it: where a failing script says why).
PREVIOUS_OUTPUT_LIMIT = 64 * 1024
#: The audit action of a host a schedule's run passed over, because the
#: schedule's previous run is still active there (no overlap allowed).
RUN_SKIPPED = "run_skipped"

JOB_FIELDS = (
    "id",
    "name",
    "script",
    "interpreter",
    "privilege",
    "priority",
    "timeout",
    "output_limit",
    "max_attempts",
    "not_before",
    "expires_at",
    "rerun_on_agent_crash",
    "created_at",
    "cancelled_at",
)
ASSIGNMENT_FIELDS = (
    "state",
    "attempt",
    "exit_code",
    "sent_at",
    "acknowledged_at",
    "started_at",
    "finished_at",
    "output",
    "output_truncated",
    "reason",
    "delivery_id",
    "updated_at",
)


def no_target_error(user: str, privilege: str, refused: list[str]) -> Forbidden:
    """The refusal of a submission that no target accepts, naming each refused target."""
    return Forbidden(f"{user} may not {privilege} on any target: " + "; ".join(refused))


class Jobs:
    """Job definitions and their fan-out into assignments."""

    def __init__(self, database: Database, audit: AuditTrail) -> None:
        self.db = database
        self.audit = audit

    def submit(
        self,
        owner: Caller,
        spec: JobSpec,
        hosts: Sequence[str],
        groups: Sequence[str],
        request_key: str | None = None,
    ) -> SubmitResult:
        """Write a job and one pending assignment per accepted, permitted target.

        Hosts and (nested) client groups are resolved to clients; each is checked
        (accepted, ACL) and a refused one is named in the answer and the audit
        trail. With no target left the call fails with ``Forbidden`` and nothing
        is written. A ``request_key`` the owner used before returns that job's
        answer (``repeated``) and writes nothing; with another definition it is
        ``Conflict``. Two submissions racing with one key make one job: the
        unique (owner, request_key) lets one insert win, the other answers with
        the winner's job.
        """
        now = utcnow()
        with self.db.tx() as session:
            if request_key is not None:
                first = self._by_request_key(session, owner, spec, request_key)
                if first is not None:
                    return first
            accepted, refused = resolve_targets(session, owner, spec.privilege, hosts, groups)
            if not accepted:
                raise no_target_error(owner.name, spec.privilege, refused)
            job = Job(owner_id=owner.id, created_at=now, request_key=request_key, **vars(spec))
            if not insert_job(session, job):
                first = (
                    self._by_request_key(session, owner, spec, request_key)
                    if request_key is not None
                    else None
                )
                if first is None:
                    raise Conflict(f"job {job.name} conflicts with an existing job")
                return first
            fan_out(session, self.audit, job, accepted, refused, owner.actor, now)
            log_after_commit(
                session,
                log,
                logging.INFO,
                "job %s (%s) submitted by %s for %d client(s), %d refused",
                job.id,
                spec.name,
                owner.name,
                len(accepted),
                len(refused),
                extra=logformat.event(job=job.id, who=owner.actor, what="submitted"),
            )
            return SubmitResult(job.id, [c for _, c in accepted], refused)

    def _by_request_key(
        self, session: Session, owner: Caller, spec: JobSpec, request_key: str
    ) -> SubmitResult | None:
        """The answer of the owner's job with this request key, if there is one:
        its clients, and the refusals its audit rows recorded."""
        job = session.scalars(
            select(Job).where(Job.owner_id == owner.id, Job.request_key == request_key)
        ).first()
        if job is None:
            return None
        differs = sorted(name for name, value in vars(spec).items() if getattr(job, name) != value)
        if differs:
            raise Conflict(
                f"request key {request_key} was used for job {job.id} with another "
                f"{', '.join(differs)}; use a new key for a new job",
                job_id=job.id,
            )
        accepted = session.scalars(
            select(Client.name)
            .join(Assignment, Assignment.client_id == Client.id)
            .where(Assignment.job_id == job.id)
            .order_by(Client.name)
        ).all()
        refused = session.scalars(
            select(Event.detail)
            .where(Event.job_id == job.id, Event.action == "submit_refused")
            .order_by(Event.id)
        ).all()
        log_after_commit(
            session,
            log,
            logging.INFO,
            "job %s: submission with request key %s repeated by %s",
            job.id,
            request_key,
            owner.name,
            extra=logformat.event(job=job.id, who=owner.actor, what="submission repeated"),
        )
        return SubmitResult(job.id, list(accepted), [r for r in refused if r], repeated=True)

    def listing(
        self,
        caller: Caller,
        limit: int = 50,
        state: str | None = None,
        before: int | None = None,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` of the newest jobs the caller may see (an admin sees
        all) with an id below ``before``, oldest first, each with its summary
        word. With ``state``, the newest ``limit`` jobs in that summary: the
        search goes back page by page, so the oldest id shown is the cursor of
        the next page whatever the filter."""
        out: list[dict[str, Any]] = []
        page = max(limit, 200)
        with self.db.tx(write=False) as session:
            while len(out) < limit:
                query = (
                    select(Job, User.name)
                    .join(User, User.id == Job.owner_id)
                    .order_by(Job.id.desc())
                    .limit(page)
                )
                if not caller.is_admin:
                    query = query.where(Job.owner_id == caller.id)
                if before is not None:
                    query = query.where(Job.id < before)
                rows = session.execute(query).all()
                if not rows:
                    break
                before = rows[-1][0].id
                counts: dict[int, dict[str, int]] = {}
                for job_id, st, n in session.execute(
                    select(Assignment.job_id, Assignment.state, sa.func.count())
                    .where(Assignment.job_id.in_([job.id for job, _ in rows]))
                    .group_by(Assignment.job_id, Assignment.state)
                ):
                    counts.setdefault(job_id, {})[st] = n
                for job, owner in rows:
                    states = counts.get(job.id, {})
                    summary = job_summary(states)
                    if state and summary != state:
                        continue
                    out.append(
                        row_dict(job, "id", "name", "priority", "privilege", "created_at")
                        | {
                            "owner": owner,
                            "state": summary,
                            "states": states,
                            "cancelled": job.cancelled_at is not None,
                        }
                    )
                    if len(out) == limit:
                        break
                if len(rows) < page:
                    break
        out.reverse()
        return out

    def detail(self, caller: Caller, job_id: int) -> dict[str, Any]:
        """One job the caller may see, with every assignment and its result."""
        with self.db.tx(write=False) as session:
            job = _visible_job(session, caller, job_id)
            owner = session.get(User, job.owner_id)
            rows = session.execute(
                select(Assignment, Client.name)
                .join(Client, Client.id == Assignment.client_id)
                .where(Assignment.job_id == job_id)
                .order_by(Client.name)
            ).all()
            assignments = [{"client": cname} | row_dict(a, *ASSIGNMENT_FIELDS) for a, cname in rows]
            states: dict[str, int] = {}
            for a in assignments:
                states[a["state"]] = states.get(a["state"], 0) + 1
            schedule = session.get(Schedule, job.schedule_id) if job.schedule_id else None
            notes = session.execute(
                select(Event.action, Event.detail)
                .where(
                    Event.job_id == job_id,
                    Event.action.in_(["submit_refused", RUN_SKIPPED]),
                )
                .order_by(Event.id)
            ).all()
            return row_dict(job, *JOB_FIELDS) | {
                "owner": owner.name if owner else "?",
                "state": job_summary(states),
                "assignments": assignments,
                # A run of a schedule: which one, and the slot it was made for.
                "schedule_id": job.schedule_id,
                "schedule": schedule.name if schedule else None,
                "due_at": job.due_at,
                "refused": [d for action, d in notes if action == "submit_refused" and d],
                "skipped": [d for action, d in notes if action == RUN_SKIPPED and d],
            }

    def host_result(self, caller: Caller, job_id: int, host: str) -> dict[str, Any]:
        """One host's assignment of a job the caller may see, with its output:
        what ``job output`` follows, without reading every other host's."""
        with self.db.tx(write=False) as session:
            _visible_job(session, caller, job_id)
            row = session.execute(
                select(Assignment)
                .join(Client, Client.id == Assignment.client_id)
                .where(Assignment.job_id == job_id, Client.name == host)
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"job {job_id} has no host {host}", job_id=job_id)
            return {"client": host} | row_dict(row, *ASSIGNMENT_FIELDS)

    def retry(self, caller: Caller, job_id: int, hosts: Sequence[str] = ()) -> RetryResult:
        """Re-queue the hosts of a finished job that failed or timed out (only
        ``hosts`` when given) as a new attempt of the same job.

        Each host goes back to ``pending`` with a ``retry`` audit row by the
        caller that keeps the previous attempt's state, exit code, reason and
        output; its attempt budget (``max_attempts``) starts afresh. The ACL is
        checked at dispatch, as for any job. A host whose client is no longer
        accepted is refused. Refused as a whole (``Conflict``, nothing written)
        when the job is not final, was cancelled, has expired, or has no host
        to retry; a named host the job does not have is ``NotFound``.
        """
        now = utcnow()
        with self.db.tx() as session:
            job = _visible_job(session, caller, job_id)
            rows = session.execute(
                self.db.for_update(
                    select(Assignment, Client.name, Client.status)
                    .join(Client, Client.id == Assignment.client_id)
                    .where(Assignment.job_id == job_id)
                    .order_by(Client.name)
                )
            ).all()
            active = sorted({a.state for a, _, _ in rows if State(a.state) not in FINAL})
            if active:
                raise Conflict(
                    f"job {job_id} has not finished (hosts still {', '.join(active)}); "
                    "wait for it (job wait) or cancel it first",
                    job_id=job_id,
                )
            if job.cancelled_at is not None:
                raise Conflict(
                    f"job {job_id} was cancelled; submit it again instead", job_id=job_id
                )
            if job.expires_at is not None and job.expires_at <= now:
                raise Conflict(
                    f"job {job_id} expired at {job.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                    "submit it again instead",
                    job_id=job_id,
                )
            by_name = {cname: (a, status) for a, cname, status in rows}
            for name in hosts:
                if name not in by_name:
                    raise NotFound(f"job {job_id} has no host {name}", job_id=job_id)
            chosen = [n for n in by_name if not hosts or n in hosts]
            not_retryable = [
                f"{n} ({by_name[n][0].state})"
                for n in chosen
                if State(by_name[n][0].state) not in RETRYABLE
            ]
            if hosts and not_retryable:
                raise Conflict(
                    f"job {job_id}: only failed or timed-out hosts can be retried, not "
                    + ", ".join(not_retryable),
                    job_id=job_id,
                )
            candidates = [n for n in chosen if State(by_name[n][0].state) in RETRYABLE]
            if not candidates:
                raise Conflict(
                    f"job {job_id} has no failed or timed-out host to retry "
                    f"(hosts: {', '.join(not_retryable) or 'none'})",
                    job_id=job_id,
                )
            result = RetryResult(job_id)
            for name in candidates:
                assignment, status = by_name[name]
                if status != ClientStatus.ACCEPTED:
                    result.refused.append(f"{name} (client is {status})")
                    continue
                self.audit.move(
                    session,
                    assignment,
                    State.PENDING,
                    by=caller.actor,
                    client=name,
                    action=RETRY,
                    why=_previous_attempt(assignment),
                    now=now,
                )
                _reset_for_retry(assignment, now)
                result.retried.append(name)
            if not result.retried:
                raise Conflict(
                    f"job {job_id}: no host can be retried: " + "; ".join(result.refused),
                    job_id=job_id,
                )
            log_after_commit(
                session,
                log,
                logging.INFO,
                "job %s retried by %s on %d host(s), %d refused",
                job_id,
                caller.name,
                len(result.retried),
                len(result.refused),
                extra=logformat.event(job=job_id, who=caller.actor, what="retried"),
            )
            return result

    def cancel(self, caller: Caller, job_id: int) -> int:
        """Cancel every unfinished assignment of a job; returns how many."""
        now = utcnow()
        with self.db.tx() as session:
            job = _visible_job(session, caller, job_id)
            job.cancelled_at = job.cancelled_at or now
            rows = session.execute(
                self.db.for_update(
                    select(Assignment, Client.name)
                    .join(Client, Client.id == Assignment.client_id)
                    .where(Assignment.job_id == job_id, Assignment.state.not_in(list(FINAL)))
                )
            ).all()
            for assignment, cname in rows:
                self.audit.move(
                    session,
                    assignment,
                    State.CANCELLED,
                    by=caller.actor,
                    client=cname,
                    action="cancel",
                    now=now,
                )
                assignment.finished_at = now
                assignment.reason = f"cancelled by {caller.name}"
            return len(rows)

    def clients_of(self, job_id: int) -> set[str]:
        """The names of the clients a job was for (whom a change to it concerns)."""
        with self.db.tx(write=False) as session:
            return set(
                session.scalars(
                    select(Client.name)
                    .join(Assignment, Assignment.client_id == Client.id)
                    .where(Assignment.job_id == job_id)
                )
            )


def resolve_targets(
    session: Session,
    owner: Caller,
    privilege: str,
    hosts: Sequence[str],
    groups: Sequence[str],
    missing_refused: bool = False,
) -> tuple[list[tuple[int, str]], list[str]]:
    """The (id, name) of each target client that takes a job of ``owner`` with
    ``privilege`` (accepted, and the ACL permits it), sorted by name, and why
    each other target is refused. A host or group that does not exist is
    ``NotFound``, or with ``missing_refused`` (a schedule's run, whose targets
    were checked when it was made) one more refusal."""
    targets: dict[int, str] = {}
    refused: list[str] = []
    for name in hosts:
        try:
            client = directory.find_client(session, name)
        except NotFound:
            if not missing_refused:
                raise
            refused.append(f"{name} (no such client)")
            continue
        targets[client.id] = client.name
    for group in groups:
        try:
            members = directory.clients_in_groups(session, [group])
        except NotFound:
            if not missing_refused:
                raise
            refused.append(f"@{group} (no such client group)")
            continue
        for cid in members:
            targets.setdefault(cid, "")
    if not targets:
        if missing_refused:
            return [], refused
        raise InvalidArgument("the job has no target clients")
    clients = session.execute(
        select(Client.id, Client.name, Client.status).where(Client.id.in_(list(targets)))
    ).all()
    names = {cid: cname for cid, cname, _ in clients}
    statuses = {cid: status for cid, _, status in clients}
    subject = directory.acl_subject(session, owner.id)
    acl_targets = directory.acl_targets(session, names)
    grants = directory.acl_grants(session, acl_targets.values())
    accepted: list[tuple[int, str]] = []
    for cid, cname in sorted(names.items(), key=lambda kv: kv[1]):
        if statuses[cid] != ClientStatus.ACCEPTED:
            refused.append(f"{cname} (client is {statuses[cid]})")
        elif not acl.permitted(subject, privilege, acl_targets[cid], grants):
            refused.append(f"{cname} (no grant: {owner.name} may not {privilege})")
        else:
            accepted.append((cid, cname))
    return accepted, refused


def insert_job(session: Session, job: Job | Schedule) -> bool:
    """Add a job (or schedule) row; ``False`` when a unique key (the owner's
    request key, a schedule's due time) already names another, which then stands."""
    try:
        # A savepoint: on PostgreSQL a racing insert with the same key makes
        # this one wait for it, then fail once it commits.
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        return False
    return True


def fan_out(
    session: Session,
    audit: AuditTrail,
    job: Job,
    accepted: list[tuple[int, str]],
    refused: list[str],
    actor: str,
    now: dt.datetime,
    detail: str | None = None,
) -> None:
    """One pending assignment per accepted client, each with its ``submit``
    row, and a ``submit_refused`` row per refused target."""
    for cid, cname in accepted:
        session.add(
            Assignment(
                job_id=job.id,
                client_id=cid,
                state=State.PENDING.value,
                priority=job.priority,
                job_created_at=now,
                attempt=0,
                updated_at=now,
            )
        )
        audit.write(
            session,
            actor,
            "submit",
            job_id=job.id,
            client=cname,
            new=State.PENDING.value,
            detail=detail,
            at=now,
        )
    for why in refused:
        audit.write(
            session,
            actor,
            "submit_refused",
            job_id=job.id,
            client=why.split(" ", 1)[0].removeprefix("@"),
            detail=why,
            at=now,
        )


def _previous_attempt(assignment: Assignment) -> str:
    """The ``retry`` row's record of the attempt it replaces: its end, and the
    end of its output."""
    parts = [f"attempt {assignment.attempt} {assignment.state}"]
    if assignment.exit_code is not None:
        parts.append(f"exit code {assignment.exit_code}")
    if assignment.reason:
        parts.append(assignment.reason)
    summary = "; ".join(parts)
    output = assignment.output
    if not output:
        return f"{summary}; no output"
    if len(output) > PREVIOUS_OUTPUT_LIMIT:
        kept = output[-PREVIOUS_OUTPUT_LIMIT:]
        return f"{summary}; the last {len(kept)} of {len(output)} characters of output:\n{kept}"
    truncated = " (cut at the job's output limit)" if assignment.output_truncated else ""
    return f"{summary}; output{truncated}:\n{output}"


def _reset_for_retry(assignment: Assignment, now: dt.datetime) -> None:
    """A retried assignment as a fresh one, but for its attempt count: the next
    delivery is attempt ``attempt + 1``, with the whole budget after it."""
    assignment.retry_base = assignment.attempt
    assignment.delivery_id = None
    assignment.server_id = None
    assignment.ack_deadline = None
    assignment.sent_at = None
    assignment.acknowledged_at = None
    assignment.started_at = None
    assignment.finished_at = None
    assignment.exit_code = None
    assignment.output = None
    assignment.output_truncated = False
    assignment.reason = None


def _visible_job(session: Session, caller: Caller, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None or (not caller.is_admin and job.owner_id != caller.id):
        raise NotFound(f"no job {job_id}")
    return job
