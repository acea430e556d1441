"""The store on a real SQLite file and a real PostgreSQL database: claims, the ACL at dispatch, reports,
leases, expiry, lost runs, reconciliation and the claim race.

Users and clients are made directly through ``Store`` methods (no PKI): the
store only keeps fingerprints, so any unique 64-hex string stands in for one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scire_schema import documents
from scire_server import migrations, recovery
from scire_server.config import ServerConfig
from scire_server.exceptions import (
    Conflict,
    EnrollmentRefused,
    Forbidden,
    IllegalTransition,
    NotFound,
    NotHeld,
)
from scire_server.models import Assignment, Event, Job
from scire_server.store import (
    Caller,
    Certificate,
    JobSpec,
    Store,
    SubmitResult,
    make_engine,
    utcnow,
)
from scire_server.store.jobs import no_target_error

ACK_TIMEOUT = 60  # seconds


def fingerprint(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@dataclasses.dataclass
class World:
    store: Store
    admin: Caller
    alice: Caller
    web: Caller
    db: Caller

    def user(self, name: str) -> Caller:
        return _caller(self.store, name)


def _caller(store: Store, name: str) -> Caller:
    caller, why = store.directory.caller_by_fingerprint(fingerprint(name))
    assert caller is not None, why
    return caller


def add_client(store: Store, name: str) -> Caller:
    status = store.directory.register_client(
        name, f"CSR of {name}", {"os": "Linux"}, None, key_fingerprint=fingerprint(f"key {name}")
    )
    assert status == "pending"
    certificate = Certificate(f"CSR of {name}", f"CERT of {name}", fingerprint(name))
    store.directory.accept_client(name, certificate, "user:admin")
    return _caller(store, name)


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The same world on both databases; PostgreSQL comes from the session cluster."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'scire.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    migrations.upgrade(url)
    store = Store(make_engine(url), "test-server")
    store.servers.start(
        "test-server", "localhost", 1, "https://localhost:8443/", 30, is_alive=lambda _pid: False
    )
    store.directory.add_user("admin", fingerprint("admin"), True, "test")
    store.directory.add_user("alice", fingerprint("alice"), False, "test")
    try:
        yield World(
            store,
            _caller(store, "admin"),
            _caller(store, "alice"),
            add_client(store, "web-17"),
            add_client(store, "db-1"),
        )
    finally:
        store.close()


def spec(**changes: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "job",
        "script": "echo hello\n",
        "interpreter": "/bin/sh",
        "privilege": "run",
        "priority": 0,
        "timeout": 60,
        "output_limit": 65536,
        "max_attempts": 3,
        "not_before": None,
        "expires_at": None,
        "rerun_on_agent_crash": False,
    }
    values.update(changes)
    return JobSpec(**values)


def submit(
    w: World, owner: Caller | None = None, hosts: tuple[str, ...] = ("web-17",), **changes: Any
) -> int:
    return w.store.jobs.submit(owner or w.admin, spec(**changes), list(hosts), []).job_id


def poll(
    w: World,
    client: Caller | None = None,
    held: list[int] | None = None,
    running: list[int] | None = None,
    limit: int = 10,
) -> list[documents.JobDocument]:
    result = w.store.assignments.poll(
        client or w.web, held or [], running or [], limit, ACK_TIMEOUT
    )
    # Rendered as the API renders them, each valid against job.xsd.
    return [documents.parse_job(documents.render_job(d)) for d in result.deliveries]


def state(w: World, job_id: int, client: str = "web-17") -> str:
    detail = w.store.jobs.detail(w.admin, job_id)
    return next(str(a["state"]) for a in detail["assignments"] if a["client"] == client)


def assignment(w: World, job_id: int, client: str = "web-17") -> dict[str, Any]:
    detail = w.store.jobs.detail(w.admin, job_id)
    return next(a for a in detail["assignments"] if a["client"] == client)


def report(
    w: World, doc: documents.JobDocument, new: str, client: Caller | None = None, **changes: Any
) -> str:
    status = documents.StatusReport(
        job_id=doc.job_id, delivery_id=doc.delivery_id, state=new, **changes
    )
    # Through the wire format, as the server gets it.
    parsed = documents.parse_status(documents.render_status(status))
    return w.store.assignments.report(client or w.web, parsed)


def actions(w: World, job_id: int) -> list[str]:
    return [e["action"] for e in w.store.audit.events(job_id=job_id)]


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


# --- submit and poll -------------------------------------------------------------


def test_poll_claims_highest_priority_then_oldest(world: World) -> None:
    low = submit(world, name="low", priority=-5)
    high_old = submit(world, name="high-old", priority=5)
    middle = submit(world, name="middle", priority=0)
    high_new = submit(world, name="high-new", priority=5)
    docs = poll(world)
    assert [d.job_id for d in docs] == [high_old, high_new, middle, low]
    first = docs[0]
    assert (first.name, first.owner, first.client, first.attempt) == (
        "high-old",
        "admin",
        "web-17",
        1,
    )
    assert first.script == "echo hello\n" and first.priority == 5
    assert len(first.delivery_id) == 32
    for doc in docs:
        assert state(world, doc.job_id) == "sent"
        assert actions(world, doc.job_id) == ["submit", "send"]
    assert poll(world) == []  # nothing is sent twice


def test_poll_only_claims_for_the_calling_client(world: World) -> None:
    job = submit(world, hosts=("web-17", "db-1"))
    assert [d.client for d in poll(world, world.db)] == ["db-1"]
    assert state(world, job, "web-17") == "pending"
    assert [d.client for d in poll(world, world.web)] == ["web-17"]


def test_poll_respects_not_before(world: World) -> None:
    submit(world, not_before=later(3600))
    due = submit(world)
    assert [d.job_id for d in poll(world)] == [due]


def test_poll_with_limit(world: World) -> None:
    jobs = [submit(world, name=f"j{i}") for i in range(5)]
    assert [d.job_id for d in poll(world, limit=2)] == jobs[:2]
    assert [d.job_id for d in poll(world, limit=2)] == jobs[2:4]
    assert poll(world, limit=0) == []
    assert state(world, jobs[4]) == "pending"
    assert [d.job_id for d in poll(world, limit=2)] == jobs[4:]


def test_submit_without_grant_is_refused(world: World) -> None:
    with pytest.raises(Forbidden, match="alice may not run"):
        submit(world, owner=world.alice)


def test_submit_names_refused_targets(world: World) -> None:
    world.store.directory.add_grant("alice", "run", "web-17", "user:admin")
    result = world.store.jobs.submit(world.alice, spec(), ["web-17", "db-1"], [])
    assert result.accepted == ["web-17"]
    assert result.refused == ["db-1 (no grant: alice may not run)"]
    assert "submit_refused" in actions(world, result.job_id)


def test_submit_to_a_nested_group_through_a_group_grant(world: World) -> None:
    store = world.store
    store.directory.create_group("client", "web", "user:admin")
    store.directory.create_group("client", "prod", "user:admin")
    store.directory.add_member("client", "web", "web-17", "user:admin")
    store.directory.add_member("client", "prod", "@web", "user:admin")
    store.directory.add_member("client", "prod", "db-1", "user:admin")
    store.directory.create_group("user", "ops", "user:admin")
    store.directory.add_member("user", "ops", "alice", "user:admin")
    store.directory.add_grant("@ops", "run", "@prod", "user:admin")
    result = store.jobs.submit(world.alice, spec(), [], ["prod"])
    assert sorted(result.accepted) == ["db-1", "web-17"]
    assert [d.client for d in poll(world, world.web)] == ["web-17"]


def test_acl_denial_at_dispatch(world: World) -> None:
    grant = world.store.directory.add_grant("alice", "run", "web-17", "user:admin")
    job = submit(world, owner=world.alice)
    world.store.directory.remove_grant(grant, "user:admin")
    result = world.store.assignments.poll(world.web, [], [], 10, ACK_TIMEOUT)
    assert result.deliveries == [] and result.denied == 1
    assert state(world, job) == "denied"
    deny = [e for e in world.store.audit.events(job_id=job) if e["action"] == "deny"]
    assert len(deny) == 1
    assert deny[0]["old_state"] == "pending" and deny[0]["new_state"] == "denied"
    assert "alice may not run on web-17 at dispatch" in deny[0]["detail"]
    assert assignment(world, job)["reason"] == deny[0]["detail"]


def test_revoked_owner_is_denied_at_dispatch(world: World) -> None:
    world.store.directory.add_grant("alice", "*", "web-17", "user:admin")
    job = submit(world, owner=world.alice)
    world.store.directory.revoke_user("alice", "user:admin")
    assert poll(world) == []
    assert state(world, job) == "denied"


# --- acknowledge and report -----------------------------------------------------------


def test_acknowledge_is_idempotent(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    pair = [(job, doc.delivery_id)]
    assert world.store.assignments.acknowledge(world.web, pair).kept == [job]
    assert world.store.assignments.acknowledge(world.web, pair).kept == [job]
    assert state(world, job) == "acknowledged"
    assert actions(world, job).count("acknowledge") == 1


def test_acknowledge_with_a_wrong_delivery_or_client_changes_nothing(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    assert world.store.assignments.acknowledge(world.web, [(job, "0" * 32)]).kept == []
    assert world.store.assignments.acknowledge(world.db, [(job, doc.delivery_id)]).kept == []
    assert state(world, job) == "sent"


def test_acknowledge_as_started_moves_to_running_with_one_audit_row(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    started = dt.datetime(2026, 1, 1, 12, 0, 0)
    done = world.store.assignments.acknowledge(world.web, [(job, doc.delivery_id)], {job: started})
    assert (done.kept, done.started) == ([job], [job])
    assert state(world, job) == "running"
    assert assignment(world, job)["started_at"].replace(tzinfo=None) == started
    assert actions(world, job).count("acknowledge") == 1
    # The running report the agent may still send (an older agent, a retry) is a duplicate.
    assert report(world, doc, "running", started=started) == "duplicate"
    # A repeated acknowledgement keeps the job and starts nothing again.
    again = world.store.assignments.acknowledge(world.web, [(job, doc.delivery_id)], {job: started})
    assert (again.kept, again.started) == ([job], [])
    assert report(world, doc, "succeeded", exit_code=0, output="") == "applied"
    assert state(world, job) == "succeeded"


def test_report_many_applies_each_and_refuses_only_the_bad_one(world: World) -> None:
    first, second = submit(world), submit(world)
    docs = {d.job_id: d for d in poll(world)}
    world.store.assignments.acknowledge(world.web, [(j, d.delivery_id) for j, d in docs.items()])

    def status(job_id: int, new: str, **changes: Any) -> documents.StatusReport:
        rendered = documents.render_status(
            documents.StatusReport(
                job_id=job_id, delivery_id=docs[job_id].delivery_id, state=new, **changes
            )
        )
        return documents.parse_status(rendered)

    stranger = documents.parse_status(
        documents.render_status(
            documents.StatusReport(job_id=999_999, delivery_id="a" * 32, state="running")
        )
    )
    outcomes = world.store.assignments.report_many(
        world.web,
        [
            status(first, "succeeded", exit_code=0, output="one"),
            stranger,
            status(second, "running"),
            status(second, "failed", exit_code=3, output="two"),
            status(first, "succeeded", exit_code=0, output="one"),
        ],
    )
    assert outcomes[0] == "applied"
    assert isinstance(outcomes[1], NotHeld)
    assert outcomes[2:] == ["applied", "applied", "duplicate"]
    assert (state(world, first), state(world, second)) == ("succeeded", "failed")
    # One audit row per transition, the refused report wrote none.
    assert actions(world, second).count("report") == 2
    assert assignment(world, second)["exit_code"] == 3


def test_report_transitions_and_duplicates(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    world.store.assignments.acknowledge(world.web, [(job, doc.delivery_id)])
    started = dt.datetime(2026, 1, 1, 12, 0, 0)
    assert report(world, doc, "running", started=started) == "applied"
    assert report(world, doc, "running", started=started) == "duplicate"
    assert state(world, job) == "running"
    final = {
        "exit_code": 0,
        "started": started,
        "finished": started + dt.timedelta(seconds=2),
        "output": "hello\n",
    }
    assert report(world, doc, "succeeded", **final) == "applied"
    assert report(world, doc, "succeeded", **final) == "duplicate"
    row = assignment(world, job)
    assert row["state"] == "succeeded" and row["exit_code"] == 0 and row["output"] == "hello\n"
    assert row["started_at"] == started
    assert actions(world, job).count("report") == 2
    assert world.store.jobs.detail(world.admin, job)["state"] == "succeeded"


def test_live_output_keeps_the_longest_and_a_resent_chunk_changes_nothing(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    started = dt.datetime(2026, 1, 1, 12, 0, 0)
    assert report(world, doc, "running", started=started, output="a\n") == "applied"
    assert report(world, doc, "running", started=started, output="a\nb\n") == "applied"
    # Resent, or late and shorter: the stored text stays, nothing is doubled.
    assert report(world, doc, "running", started=started, output="a\nb\n") == "duplicate"
    assert report(world, doc, "running", started=started, output="a\n") == "duplicate"
    row = assignment(world, job)
    assert (row["state"], row["output"], row["output_truncated"]) == ("running", "a\nb\n", False)
    # The cap reached: same text, now marked truncated.
    assert report(world, doc, "running", output="a\nb\n", truncated=True) == "applied"
    assert assignment(world, job)["output_truncated"] is True
    # Cancelled on the server first: the agent's last report still brings the output.
    world.store.jobs.cancel(world.admin, job)
    assert report(world, doc, "cancelled", output="a\nb\nc\n") == "duplicate"
    row = assignment(world, job)
    assert (row["state"], row["output"]) == ("cancelled", "a\nb\nc\n")


def test_report_without_acknowledgement_implies_it(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    assert report(world, doc, "failed", exit_code=1) == "applied"
    assert state(world, job) == "failed"


def test_illegal_transition_raises(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    report(world, doc, "succeeded", exit_code=0)
    with pytest.raises(IllegalTransition, match="is succeeded; cannot become failed"):
        report(world, doc, "failed", exit_code=1)
    assert state(world, job) == "succeeded"


def test_report_on_a_job_not_held(world: World) -> None:
    submit(world)
    (doc,) = poll(world)
    with pytest.raises(NotHeld):
        report(world, doc, "succeeded", client=world.db)
    pending = submit(world)
    with pytest.raises(NotHeld):
        report(world, dataclasses.replace(doc, job_id=pending), "running")


def test_late_report_after_cancel_is_ignored(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    world.store.assignments.acknowledge(world.web, [(job, doc.delivery_id)])
    assert world.store.jobs.cancel(world.admin, job) == 1
    assert report(world, doc, "succeeded", exit_code=0) == "ignored"
    assert report(world, doc, "running") == "ignored"
    assert state(world, job) == "cancelled"
    late = [e for e in world.store.audit.events(job_id=job) if e["action"] == "late_report"]
    assert [(e["old_state"], e["new_state"]) for e in late] == [
        ("cancelled", "succeeded"),
        ("cancelled", "running"),
    ]


def test_cancelled_report_from_the_agent_is_a_duplicate(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    world.store.jobs.cancel(world.admin, job)
    assert report(world, doc, "cancelled") == "duplicate"


# --- leases ------------------------------------------------------------------------


def test_return_leases_then_undeliverable(world: World) -> None:
    job = submit(world, max_attempts=2)
    (first,) = poll(world)
    assert world.store.sweeps.return_leases(now=later(ACK_TIMEOUT + 1)) == {
        "returned": 1,
        "undeliverable": 0,
    }
    assert state(world, job) == "pending"
    (second,) = poll(world)
    assert second.attempt == 2 and second.delivery_id != first.delivery_id
    assert world.store.sweeps.return_leases(now=later(ACK_TIMEOUT + 1)) == {
        "returned": 0,
        "undeliverable": 1,
    }
    row = assignment(world, job)
    assert (row["state"], row["reason"], row["attempt"]) == ("failed", "undeliverable", 2)
    assert actions(world, job).count("lease_expired") == 2
    assert poll(world) == []


def test_return_leases_leaves_live_leases_and_acknowledged_jobs(world: World) -> None:
    sent = submit(world)
    acked = submit(world)
    docs = {d.job_id: d for d in poll(world)}
    world.store.assignments.acknowledge(world.web, [(acked, docs[acked].delivery_id)])
    assert world.store.sweeps.return_leases() == {"returned": 0, "undeliverable": 0}
    assert world.store.sweeps.return_leases(now=later(ACK_TIMEOUT + 1)) == {
        "returned": 1,
        "undeliverable": 0,
    }
    assert (state(world, sent), state(world, acked)) == ("pending", "acknowledged")


def test_acknowledgement_after_the_lease_ran_out_still_counts(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    world.store.sweeps.return_leases(now=later(ACK_TIMEOUT + 1))
    assert world.store.assignments.acknowledge(world.web, [(job, doc.delivery_id)]).kept == [job]
    assert state(world, job) == "acknowledged"


def test_return_leases_of_this_daemons_previous_life(world: World) -> None:
    job = submit(world)
    poll(world)
    assert world.store.sweeps.return_leases(own_previous_life=True) == {
        "returned": 1,
        "undeliverable": 0,
    }
    assert state(world, job) == "pending"


def test_restarts_never_deliver_past_max_attempts(world: World) -> None:
    job = submit(world, max_attempts=1)
    (doc,) = poll(world)
    # The last attempt stays with its lease across a restart ...
    assert world.store.sweeps.return_leases(own_previous_life=True) == {
        "returned": 0,
        "undeliverable": 0,
    }
    assert state(world, job) == "sent"
    assert poll(world) == []
    # ... and fails as undeliverable when the lease runs out.
    assert world.store.sweeps.return_leases(now=later(ACK_TIMEOUT + 1))["undeliverable"] == 1
    assert assignment(world, job)["attempt"] == 1
    assert doc.attempt == 1


def test_token_given_on_a_second_registration_is_used(world: World) -> None:
    world.store.directory.add_token(fingerprint("token"), 3600, 1, "user:admin")
    directory = world.store.directory
    key = fingerprint("key new")
    assert (
        directory.register_client("new", "CSR of new", {}, None, key_fingerprint=key) == "pending"
    )
    certificate = Certificate("CSR of new", "CERT of new", fingerprint("new"))
    token = fingerprint("token")
    assert (
        directory.register_client("new", "CSR of new", {}, token, certificate, key_fingerprint=key)
        == "accepted"
    )


# --- expiry ---------------------------------------------------------------------------


def test_expire_jobs_leaves_running_ones(world: World) -> None:
    waiting = submit(world, name="waiting", expires_at=later(3600))
    runs = submit(world, name="runs", priority=10, expires_at=later(3600))
    (doc,) = poll(world, limit=1)
    assert doc.job_id == runs and doc.expires is not None
    report(world, doc, "running")
    assert world.store.sweeps.expire() == 0
    assert world.store.sweeps.expire(now=later(7200)) == 1
    assert (state(world, waiting), state(world, runs)) == ("expired", "running")
    assert assignment(world, waiting)["reason"] == "expired before it started"


def test_poll_expires_instead_of_sending(world: World) -> None:
    job = submit(world, expires_at=utcnow() - dt.timedelta(seconds=1))
    assert poll(world) == []
    assert state(world, job) == "expired"
    assert "expire" in actions(world, job)


# --- lost runs ----------------------------------------------------------------------------


def _running(w: World, **changes: Any) -> tuple[int, documents.JobDocument]:
    job = submit(w, **changes)
    (doc,) = poll(w)
    w.store.assignments.acknowledge(w.web, [(job, doc.delivery_id)])
    report(w, doc, "running")
    return job, doc


def test_mark_lost_without_rerun_then_the_late_report_lands(world: World) -> None:
    job, doc = _running(world)
    assert world.store.sweeps.mark_lost(300) == {"lost": 0, "requeued": 0}  # the agent just polled
    assert world.store.sweeps.mark_lost(300, now=later(600)) == {"lost": 1, "requeued": 0}
    assert state(world, job) == "lost"
    assert world.store.jobs.detail(world.admin, job)["state"] == "lost"
    assert report(world, doc, "succeeded", exit_code=0) == "applied"
    assert state(world, job) == "succeeded"


def test_mark_lost_with_rerun_requeues(world: World) -> None:
    job, first = _running(world, rerun_on_agent_crash=True, max_attempts=2)
    assert world.store.sweeps.mark_lost(300, now=later(600)) == {"lost": 1, "requeued": 1}
    assert state(world, job) == "pending"
    assert actions(world, job)[-2:] == ["lost", "retry"]
    (second,) = poll(world)
    assert second.attempt == 2
    report(world, second, "running")
    # No attempts left: lost stays lost.
    assert world.store.sweeps.mark_lost(300, now=later(600)) == {"lost": 1, "requeued": 0}
    assert state(world, job) == "lost"


def test_lost_job_comes_back_when_the_agent_names_it_running(world: World) -> None:
    job, _ = _running(world)
    world.store.sweeps.mark_lost(300, now=later(600))
    poll(world, running=[job], limit=0)
    assert state(world, job) == "running"
    assert actions(world, job)[-1] == "reconcile"


# --- reconcile ----------------------------------------------------------------------------


def test_reconcile_answers_cancelled_expired_unknown(world: World) -> None:
    cancelled = submit(world, name="c")
    expired = submit(world, name="e", expires_at=later(3600))
    docs = {d.job_id: d for d in poll(world)}
    world.store.assignments.acknowledge(world.web, [(j, d.delivery_id) for j, d in docs.items()])
    world.store.jobs.cancel(world.admin, cancelled)
    world.store.sweeps.expire(now=later(7200))
    result = world.store.assignments.poll(world.web, [cancelled, expired, 9999], [], 0, ACK_TIMEOUT)
    assert sorted(result.reconcile, key=lambda r: r["job_id"]) == [
        {"job_id": cancelled, "action": "cancelled"},
        {"job_id": expired, "action": "expired"},
        {"job_id": 9999, "action": "unknown"},
    ]


def test_reconcile_running_job_named_cancelled(world: World) -> None:
    job, _ = _running(world)
    world.store.jobs.cancel(world.admin, job)
    result = world.store.assignments.poll(world.web, [], [job], 0, ACK_TIMEOUT)
    assert result.reconcile == [{"job_id": job, "action": "cancelled"}]


@pytest.mark.parametrize(("rerun", "expected"), [(False, "failed"), (True, "pending")])
def test_reconcile_job_the_agent_no_longer_holds(world: World, rerun: bool, expected: str) -> None:
    job = submit(world, rerun_on_agent_crash=rerun)
    (doc,) = poll(world)
    world.store.assignments.acknowledge(world.web, [(job, doc.delivery_id)])
    poll(world, held=[], limit=0)  # the spool was wiped
    assert state(world, job) == expected


# --- the claim race -----------------------------------------------------------------------


def test_two_threads_polling_one_client_never_get_the_same_job(world: World) -> None:
    jobs = {submit(world, name=f"j{i}") for i in range(40)}
    barrier = threading.Barrier(2)
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def agent(index: int) -> None:
        try:
            barrier.wait()
            while True:
                docs = poll(world, limit=3)
                if not docs:
                    return
                got[index].extend(d.job_id for d in docs)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert not set(got[0]) & set(got[1])
    assert len(got[0]) + len(got[1]) == len(jobs)
    assert set(got[0]) | set(got[1]) == jobs
    for job in jobs:
        assert actions(world, job).count("send") == 1


# --- idempotent submission ------------------------------------------------------------

REQUEST_KEY = "6f1c1a52-5b0e-4f7e-9a55-0d4a2f3c9e11"


def test_a_repeated_request_key_returns_the_first_job(world: World) -> None:
    jobs = world.store.jobs
    first = jobs.submit(world.admin, spec(), ["web-17", "db-1"], [], REQUEST_KEY)
    again = jobs.submit(world.admin, spec(), ["web-17", "db-1"], [], REQUEST_KEY)
    assert not first.repeated and again.repeated
    assert (again.job_id, again.accepted, again.refused) == (
        first.job_id,
        ["db-1", "web-17"],
        [],
    )
    assert [j["id"] for j in jobs.listing(world.admin)] == [first.job_id]
    assert actions(world, first.job_id) == ["submit", "submit"]  # one per client, once


def test_a_repeated_request_key_keeps_the_first_answers_refusals(world: World) -> None:
    world.store.directory.add_grant("alice", "run", "web-17", "user:admin")
    jobs = world.store.jobs
    first = jobs.submit(world.alice, spec(), ["web-17", "db-1"], [], REQUEST_KEY)
    again = jobs.submit(world.alice, spec(), ["web-17", "db-1"], [], REQUEST_KEY)
    assert first.refused == ["db-1 (no grant: alice may not run)"]
    assert (again.job_id, again.accepted, again.refused, again.repeated) == (
        first.job_id,
        ["web-17"],
        first.refused,
        True,
    )


def test_a_request_key_belongs_to_its_owner(world: World) -> None:
    world.store.directory.add_grant("alice", "*", "web-17", "user:admin")
    mine = world.store.jobs.submit(world.admin, spec(), ["web-17"], [], REQUEST_KEY)
    hers = world.store.jobs.submit(world.alice, spec(), ["web-17"], [], REQUEST_KEY)
    assert mine.job_id != hers.job_id and not hers.repeated


def test_a_request_key_reused_for_another_job_is_a_conflict(world: World) -> None:
    first = world.store.jobs.submit(world.admin, spec(), ["web-17"], [], REQUEST_KEY)
    with pytest.raises(
        Conflict, match=f"used for job {first.job_id} with another priority, script"
    ):
        world.store.jobs.submit(
            world.admin, spec(script="rm -rf /tmp/x\n", priority=5), ["web-17"], [], REQUEST_KEY
        )
    assert len(world.store.jobs.listing(world.admin)) == 1


def test_submissions_racing_with_one_key_make_one_job(world: World) -> None:
    """Four daemons (four stores on one database) get the same submission at once."""
    url = world.store.database.engine.url.render_as_string(hide_password=False)
    stores = [Store(make_engine(url), f"daemon-{i}") for i in range(4)]
    barrier = threading.Barrier(len(stores))
    answers: list[SubmitResult] = []
    errors: list[BaseException] = []

    def daemon(store: Store) -> None:
        try:
            barrier.wait()
            answers.append(store.jobs.submit(world.admin, spec(), ["web-17"], [], REQUEST_KEY))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=daemon, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []
    assert len({a.job_id for a in answers}) == 1
    assert sorted(a.repeated for a in answers) == [False, True, True, True]
    (job,) = world.store.jobs.listing(world.admin)
    assert job["states"] == {"pending": 1}


# --- enrollment requests ------------------------------------------------------------


def test_a_pending_name_keeps_its_key(world: World) -> None:
    directory = world.store.directory
    key = fingerprint("key of the agent")
    assert directory.register_client("new", "CSR 1", {}, None, key_fingerprint=key) == "pending"
    with pytest.raises(EnrollmentRefused, match="an administrator must reject or delete"):
        directory.register_client(
            "new", "CSR of an intruder", {}, None, key_fingerprint=fingerprint("intruder")
        )
    # The same key with a new request (only the key's holder can sign one) is kept.
    assert directory.register_client("new", "CSR 2", {}, None, key_fingerprint=key) == "pending"
    row = directory.enrollment("new")
    assert (row["csr_pem"], row["key_fingerprint"]) == ("CSR 2", key)
    assert next(c for c in directory.clients() if c["name"] == "new")["key_fingerprint"] == key
    assert directory.client_detail("new")["key_fingerprint"] == key


def test_a_rejected_name_takes_a_new_key_but_not_the_rejected_one(world: World) -> None:
    directory = world.store.directory
    old, new = fingerprint("old key"), fingerprint("new key")
    directory.register_client("new", "CSR 1", {}, None, key_fingerprint=old)
    directory.reject_client("new", "user:admin")
    assert directory.register_client("new", "CSR 1b", {}, None, key_fingerprint=old) == "rejected"
    assert directory.register_client("new", "CSR 2", {}, None, key_fingerprint=new) == "pending"
    assert directory.enrollment("new")["key_fingerprint"] == new


# --- retention ------------------------------------------------------------------------


def test_retention_purges_old_output_and_audit_rows(world: World) -> None:
    job = submit(world)
    (doc,) = poll(world)
    report(world, doc, "succeeded", exit_code=0, output="kept until retention\n")
    pending = submit(world, hosts=("db-1",))
    assert assignment(world, job)["output"] == "kept until retention\n"
    assert world.store.sweeps.purge(older_than_days=1) == {"outputs": 0, "events": 0}
    counts = world.store.sweeps.purge(older_than_days=-1)  # everything counts as old
    assert counts["outputs"] == 1 and counts["events"] > 0
    row = assignment(world, job)
    assert (row["state"], row["output"], row["exit_code"]) == ("succeeded", None, 0)
    assert world.store.audit.events(job_id=job) == []
    assert state(world, pending, "db-1") == "pending"  # unfinished work is never purged


def age(w: World, job_id: int, days: float) -> None:
    """Make a job, and its assignments' last changes, ``days`` old."""
    then = utcnow() - dt.timedelta(days=days)
    with w.store.database.engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == job_id).values(created_at=then))
        conn.execute(
            sa.update(Assignment)
            .where(Assignment.job_id == job_id)
            .values(job_created_at=then, updated_at=then)
        )
        conn.execute(
            sa.update(Assignment)
            .where(Assignment.job_id == job_id, Assignment.finished_at.is_not(None))
            .values(finished_at=then)
        )


def rows(w: World, job_id: int) -> dict[str, int]:
    """How many rows of each table name the job."""
    with w.store.database.engine.connect() as conn:
        return {
            name: conn.scalar(sa.select(sa.func.count()).select_from(table).where(where)) or 0
            for name, table, where in (
                ("jobs", Job, Job.id == job_id),
                ("assignments", Assignment, Assignment.job_id == job_id),
                ("events", Event, Event.job_id == job_id),
            )
        }


def finished_job(w: World, days_ago: float) -> int:
    """A job that succeeded on web-17 and was cancelled on db-1, ``days_ago`` days ago."""
    job = submit(w, hosts=("web-17", "db-1"))
    (doc,) = poll(w)
    report(w, doc, "succeeded", exit_code=0, output="done\n")
    w.store.jobs.cancel(w.admin, job)
    assert {a["state"] for a in w.store.jobs.detail(w.admin, job)["assignments"]} == {
        "succeeded",
        "cancelled",
    }
    age(w, job, days_ago)
    return job


def test_job_retention_is_off_by_default(world: World) -> None:
    assert ServerConfig().job_retention_days == 0
    job = finished_job(world, days_ago=400)
    before = rows(world, job)
    counts = recovery.retention(world.store, ServerConfig())
    assert "jobs" not in counts
    # The audit rows are recent (retention_days counts from each row's own time).
    assert rows(world, job) == before and before["assignments"] == 2 and before["events"] > 0
    assert world.store.jobs.detail(world.admin, job)["id"] == job


def test_job_retention_removes_old_finished_jobs_with_their_assignments_and_audit_rows(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    old = finished_job(world, days_ago=40)
    recent = finished_job(world, days_ago=20)
    # Old, but one host has not finished: pending on db-1, then running on web-17.
    waiting = submit(world, hosts=("web-17", "db-1"))
    (doc,) = poll(world)
    report(world, doc, "succeeded", exit_code=0)
    age(world, waiting, 400)
    running = submit(world)
    (doc,) = poll(world)
    report(world, doc, "running")
    age(world, running, 400)
    kept = {job: rows(world, job) for job in (recent, waiting, running)}
    world.store.audit.record("user:admin", "note", detail="not about a job")

    config = ServerConfig(job_retention_days=30)
    with caplog.at_level(logging.INFO, logger="scire_server.recovery"):
        counts = recovery.retention(world.store, config)

    assert counts["jobs"] == 1
    assert rows(world, old) == {"jobs": 0, "assignments": 0, "events": 0}
    with pytest.raises(NotFound):
        world.store.jobs.detail(world.admin, old)
    assert world.store.audit.events(job_id=old) == []
    assert {job: rows(world, job) for job in kept} == kept
    assert (state(world, waiting, "db-1"), state(world, running)) == ("pending", "running")
    assert "note" in [e["action"] for e in world.store.audit.events()]
    assert any(
        r.getMessage().startswith("retention: removed 1 finished jobs older than 30 days (2 ")
        for r in caplog.records
    ), caplog.text
    # Once it has finished, the old job goes at the next sweep; nothing else does.
    world.store.jobs.cancel(world.admin, waiting)
    age(world, waiting, 31)
    assert world.store.sweeps.purge_jobs(30)["jobs"] == 1
    assert rows(world, waiting)["jobs"] == 0
    assert world.store.sweeps.purge_jobs(30) == {
        "jobs": 0,
        "assignments": 0,
        "events": 0,
        "batches": 0,
    }
    assert rows(world, recent) == kept[recent]


def test_job_retention_works_in_batches(world: World) -> None:
    jobs = [finished_job(world, days_ago=10) for _ in range(5)]
    recent = finished_job(world, days_ago=1)
    counts = world.store.sweeps.purge_jobs(7, batch=2)
    assert (counts["jobs"], counts["assignments"], counts["batches"]) == (5, 10, 3)
    assert all(rows(world, job)["jobs"] == 0 for job in jobs)
    assert rows(world, recent)["jobs"] == 1


def test_no_target_error_names_user_privilege_and_targets() -> None:
    error = no_target_error("alice", "run", ["web-17 (no grant)", "db-1 (client is pending)"])
    assert error.code == 2
    assert "alice may not run" in error.message
    assert "web-17 (no grant); db-1 (client is pending)" in error.message


# --- job listing -----------------------------------------------------------------------


def test_job_listing_pages_back_by_cursor_whatever_the_filter(world: World) -> None:
    jobs = [submit(world, name=f"j{i}") for i in range(7)]
    # The two cancelled jobs are the oldest: a filter must look past the first page.
    for job in jobs[:2]:
        world.store.jobs.cancel(world.admin, job)
    listing = world.store.jobs.listing

    newest = listing(world.admin, 3)
    assert [j["id"] for j in newest] == jobs[4:]
    page_before = listing(world.admin, 3, before=newest[0]["id"])
    assert [j["id"] for j in page_before] == jobs[1:4]
    assert [j["id"] for j in listing(world.admin, 3, before=jobs[1])] == jobs[:1]
    assert listing(world.admin, 3, before=jobs[0]) == []

    cancelled = listing(world.admin, 1, state="cancelled")
    assert [j["id"] for j in cancelled] == jobs[1:2]
    older = listing(world.admin, 1, state="cancelled", before=cancelled[0]["id"])
    assert [j["id"] for j in older] == jobs[:1]
    # A user sees only their own jobs, paged the same way.
    assert listing(world.alice, 10) == []


# --- last seen -------------------------------------------------------------------------


def test_last_seen_batch_writes_each_client_and_never_moves_a_time_back(world: World) -> None:
    directory = world.store.directory
    first = utcnow().replace(microsecond=0)
    newest = first + dt.timedelta(seconds=60)
    assert directory.record_last_seen({"web-17": first, "db-1": first}) == 2
    assert directory.record_last_seen({"db-1": newest}) == 1
    # An older note (another daemon's, flushed late) changes nothing.
    assert (
        directory.record_last_seen({"web-17": first + dt.timedelta(seconds=30), "db-1": first}) == 1
    )
    assert directory.record_last_seen({"no-such-host": first}) == 0
    assert directory.client_detail("db-1")["last_seen_at"] == newest
