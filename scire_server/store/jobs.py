"""Jobs: submission (targets resolved, checked and fanned out into assignments),
listing, detail and cancellation."""

from __future__ import annotations

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
from scire_server.models import Assignment, Client, Event, Job, User
from scire_server.states import FINAL, ClientStatus, State, job_summary
from scire_server.store import directory
from scire_server.store.audit import AuditTrail
from scire_server.store.database import Database, row_dict, utcnow
from scire_server.store.records import Caller, JobSpec, SubmitResult

log = logging.getLogger(__name__)

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
            targets: dict[int, str] = {}
            for name in hosts:
                client = directory.find_client(session, name)
                targets[client.id] = client.name
            for cid in directory.clients_in_groups(session, groups) if groups else ():
                targets.setdefault(cid, "")
            if not targets:
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
            refused: list[str] = []
            for cid, cname in sorted(names.items(), key=lambda kv: kv[1]):
                if statuses[cid] != ClientStatus.ACCEPTED:
                    refused.append(f"{cname} (client is {statuses[cid]})")
                elif not acl.permitted(subject, spec.privilege, acl_targets[cid], grants):
                    refused.append(f"{cname} (no grant: {owner.name} may not {spec.privilege})")
                else:
                    accepted.append((cid, cname))
            if not accepted:
                raise no_target_error(owner.name, spec.privilege, refused)
            job = Job(owner_id=owner.id, created_at=now, request_key=request_key, **vars(spec))
            try:
                # A savepoint: on PostgreSQL a racing submission with the same
                # key makes this insert wait for it, then fail once it commits.
                with session.begin_nested():
                    session.add(job)
            except IntegrityError:
                first = (
                    self._by_request_key(session, owner, spec, request_key)
                    if request_key is not None
                    else None
                )
                if first is None:
                    raise
                return first
            for cid, cname in accepted:
                session.add(
                    Assignment(
                        job_id=job.id,
                        client_id=cid,
                        state=State.PENDING.value,
                        priority=spec.priority,
                        job_created_at=now,
                        attempt=0,
                        updated_at=now,
                    )
                )
                self.audit.write(
                    session,
                    owner.actor,
                    "submit",
                    job_id=job.id,
                    client=cname,
                    new=State.PENDING.value,
                    at=now,
                )
            for why in refused:
                self.audit.write(
                    session,
                    owner.actor,
                    "submit_refused",
                    job_id=job.id,
                    client=why.split(" ", 1)[0],
                    detail=why,
                    at=now,
                )
            log.info(
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
        log.info(
            "job %s: submission with request key %s repeated by %s",
            job.id,
            request_key,
            owner.name,
            extra=logformat.event(job=job.id, who=owner.actor, what="submission repeated"),
        )
        return SubmitResult(job.id, list(accepted), [r for r in refused if r], repeated=True)

    def listing(
        self, caller: Caller, limit: int = 50, state: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs the caller may see (an admin sees all), oldest
        first, each with its summary word; ``state`` keeps one summary."""
        with self.db.tx(write=False) as session:
            query = (
                select(Job, User.name)
                .join(User, User.id == Job.owner_id)
                .order_by(Job.id.desc())
                .limit(limit)
            )
            if not caller.is_admin:
                query = query.where(Job.owner_id == caller.id)
            rows = session.execute(query).all()
            ids = [job.id for job, _ in rows]
            counts: dict[int, dict[str, int]] = {}
            for job_id, st, n in session.execute(
                select(Assignment.job_id, Assignment.state, sa.func.count())
                .where(Assignment.job_id.in_(ids))
                .group_by(Assignment.job_id, Assignment.state)
            ):
                counts.setdefault(job_id, {})[st] = n
            out = []
            for job, owner in reversed(rows):
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
            return row_dict(job, *JOB_FIELDS) | {
                "owner": owner.name if owner else "?",
                "state": job_summary(states),
                "assignments": assignments,
            }

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


def _visible_job(session: Session, caller: Caller, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None or (not caller.is_admin and job.owner_id != caller.id):
        raise NotFound(f"no job {job_id}")
    return job
