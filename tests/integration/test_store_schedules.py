"""Schedules in the store, on a real SQLite file and a real PostgreSQL database:
the runs a seconds-level interval makes, catch-up after a downtime, overlap,
pause/resume/delete, who may manage them, and a run made once per slot.

The clock is never read: each tick is ``materialize(now=...)`` at a given time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scire_schema.protocol import CatchUp
from scire_server import migrations, recurrence, timed
from scire_server.config import ServerConfig
from scire_server.exceptions import Conflict, Forbidden, NotFound
from scire_server.models import Job, Schedule
from scire_server.store import Caller, Certificate, JobSpec, Store, make_engine, utcnow
from scire_server.work_due import WorkDue

# A fixed start, whole seconds, so every slot below is exact.
T0 = utcnow().replace(microsecond=0)


def at(offset: float) -> dt.datetime:
    """T0 plus ``offset`` seconds, naive UTC as the store keeps it."""
    return T0 + dt.timedelta(seconds=offset)


def fingerprint(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@dataclasses.dataclass
class World:
    store: Store
    admin: Caller
    alice: Caller


def _caller(store: Store, name: str) -> Caller:
    caller, why = store.directory.caller_by_fingerprint(fingerprint(name))
    assert caller is not None, why
    return caller


def add_client(store: Store, name: str) -> None:
    store.directory.register_client(
        name, f"CSR of {name}", {}, None, key_fingerprint=fingerprint(f"key {name}")
    )
    certificate = Certificate(f"CSR of {name}", f"CERT of {name}", fingerprint(name))
    store.directory.accept_client(name, certificate, "user:admin")


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'scire.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    migrations.upgrade(url)
    store = Store(make_engine(url), "test-server")
    store.directory.add_user("admin", fingerprint("admin"), True, "test")
    store.directory.add_user("alice", fingerprint("alice"), False, "test")
    for name in ("web-17", "web-18", "db-1"):
        add_client(store, name)
    store.directory.create_group("client", "web", "test")
    store.directory.add_member("client", "web", "web-17", "test")
    store.directory.add_member("client", "web", "web-18", "test")
    try:
        yield World(store, _caller(store, "admin"), _caller(store, "alice"))
    finally:
        store.close()


def spec(**changes: Any) -> JobSpec:
    return dataclasses.replace(JobSpec(script="echo hi\n", name="nightly", timeout=60), **changes)


def schedule(
    w: World,
    kind: str = "every",
    value: str = "1s",
    owner: Caller | None = None,
    hosts: tuple[str, ...] = ("web-17",),
    groups: tuple[str, ...] = (),
    timezone: str = "UTC",
    **options: Any,
) -> int:
    when = recurrence.Recurrence.from_request(kind, value, timezone, T0.replace(tzinfo=dt.UTC))
    result = w.store.schedules.create(
        owner or w.admin, spec(), list(hosts), list(groups), when, **options
    )
    return result.schedule_id


def runs(w: World, schedule_id: int) -> list[dict[str, Any]]:
    """The schedule's runs, oldest first."""
    return list(reversed(w.store.schedules.detail(w.admin, schedule_id)["runs"]))


def due_times(w: World, schedule_id: int) -> list[dt.datetime]:
    return [r["due_at"] for r in runs(w, schedule_id)]


def finish(w: World, job_id: int) -> None:
    w.store.jobs.cancel(w.admin, job_id)


# --- a seconds-level interval --------------------------------------------------------


def test_every_second_makes_one_run_per_second(world: World) -> None:
    sid = schedule(world, allow_overlap=True)
    for tick in (0, 0.3, 1.1, 2.0, 2.5, 3.2):
        world.store.schedules.materialize(now=at(tick))
    assert due_times(world, sid) == [at(0), at(1), at(2), at(3)]
    run = runs(world, sid)[-1]
    detail = world.store.jobs.detail(world.admin, run["job_id"])
    assert (detail["schedule_id"], detail["schedule"], detail["due_at"]) == (sid, "nightly", at(3))
    assert [a["client"] for a in detail["assignments"]] == ["web-17"]
    assert detail["assignments"][0]["state"] == "pending"
    assert world.store.schedules.detail(world.admin, sid)["next_due_at"] == at(4)


def test_a_group_target_is_resolved_at_each_run(world: World) -> None:
    sid = schedule(world, hosts=(), groups=("web",), allow_overlap=True)
    assert world.store.schedules.materialize(now=at(0)) == {"web-17", "web-18"}
    world.store.directory.add_member("client", "web", "db-1", "test")
    assert world.store.schedules.materialize(now=at(1)) == {"web-17", "web-18", "db-1"}
    assert len(runs(world, sid)) == 2


def test_an_at_schedule_runs_once_then_is_finished(world: World) -> None:
    sid = schedule(world, "at", (T0 + dt.timedelta(seconds=5)).isoformat())
    assert world.store.schedules.materialize(now=at(4)) == set()
    assert world.store.schedules.materialize(now=at(5.5)) == {"web-17"}
    assert world.store.schedules.materialize(now=at(60)) == set()
    detail = world.store.schedules.detail(world.admin, sid)
    assert (detail["state"], detail["next_due_at"], detail["run_count"]) == ("finished", None, 1)


# --- catch-up after a downtime -------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "gap_runs"),
    [
        (CatchUp.ONCE, [at(10)]),
        (CatchUp.ALL, [at(s) for s in range(10, 61, 10)]),
        (CatchUp.SKIP, []),
    ],
)
def test_a_downtime_over_several_slots(
    world: World, policy: CatchUp, gap_runs: list[dt.datetime]
) -> None:
    """Ticks at 0 s, then none until 65 s (the daemons were down over the slots
    10..60 s), then one at 70 s."""
    sid = schedule(world, value="10s", catch_up=policy, allow_overlap=True)
    world.store.schedules.materialize(now=at(0), grace=3)
    world.store.schedules.materialize(now=at(65), grace=3)
    assert due_times(world, sid) == [at(0), *gap_runs]
    world.store.schedules.materialize(now=at(70.5), grace=3)
    assert due_times(world, sid) == [at(0), *gap_runs, at(70)]


# --- overlap -----------------------------------------------------------------------------


def test_no_run_starts_on_a_host_where_the_previous_is_active(world: World) -> None:
    """A host still busy with the schedule's previous run is skipped for this
    run, with the reason; the run itself is made (its slot is spent)."""
    sid = schedule(world, hosts=("web-17", "db-1"))
    assert world.store.schedules.materialize(now=at(0)) == {"web-17", "db-1"}
    busy = runs(world, sid)[0]["job_id"]
    world.store.assignments.poll(_caller(world.store, "db-1"), [], [], 10, 60)  # now sent
    assert world.store.schedules.materialize(now=at(1)) == set()
    second = world.store.jobs.detail(world.admin, runs(world, sid)[1]["job_id"])
    assert second["assignments"] == []
    assert second["state"] == "empty"
    assert second["skipped"] == [
        f"db-1 (run {busy} of this schedule is still active there)",
        f"web-17 (run {busy} of this schedule is still active there)",
    ]
    shown = world.store.schedules.detail(world.admin, sid)["runs"][0]
    assert len(shown["skipped"]) == 2
    # Once the first run is over on every host, the next run takes them again.
    finish(world, busy)
    assert world.store.schedules.materialize(now=at(2)) == {"web-17", "db-1"}


def test_allow_overlap_starts_every_run(world: World) -> None:
    sid = schedule(world, allow_overlap=True)
    for tick in (0, 1, 2):
        assert world.store.schedules.materialize(now=at(tick)) == {"web-17"}
    assert all(r["state"] == "pending" for r in runs(world, sid))


# --- pause, resume, delete, and who may ------------------------------------------------


def test_pause_resume_delete(world: World) -> None:
    sid = schedule(world, value="10s", allow_overlap=True)
    world.store.schedules.materialize(now=at(0))
    assert world.store.schedules.pause(world.admin, sid)["state"] == "paused"
    assert world.store.schedules.pause(world.admin, sid)["state"] == "paused"  # idempotent
    world.store.schedules.materialize(now=at(35))
    assert due_times(world, sid) == [at(0)]
    resumed = world.store.schedules.resume(world.admin, sid)
    assert resumed["state"] == "active"
    # The slots while paused are not runs: the next is the first from now on.
    assert resumed["next_due_at"] >= utcnow().replace(microsecond=0) - dt.timedelta(seconds=10)
    assert world.store.schedules.delete(world.admin, sid)["state"] == "deleted"
    world.store.schedules.materialize(now=at(10_000_000))
    assert due_times(world, sid) == [at(0)]
    with pytest.raises(Conflict, match="deleted"):
        world.store.schedules.resume(world.admin, sid)
    assert [s["id"] for s in world.store.schedules.listing(world.admin)] == []
    assert [s["id"] for s in world.store.schedules.listing(world.admin, True)] == [sid]
    actions = [e["action"] for e in world.store.audit.events() if "schedule" in e["action"]]
    assert actions == [
        "schedule_created",
        "schedule_paused",
        "schedule_resumed",
        "schedule_deleted",
    ]


def test_the_owner_or_an_admin_manages_a_schedule_nobody_else(world: World) -> None:
    world.store.directory.add_grant("alice", "run", "web-17", "test")
    mine = schedule(world, owner=world.alice)
    theirs = schedule(world)
    assert world.store.schedules.pause(world.alice, mine)["state"] == "paused"
    assert world.store.schedules.resume(world.admin, mine)["state"] == "active"
    for verb in ("detail", "pause", "resume", "delete"):
        with pytest.raises(NotFound, match=f"no schedule {theirs}"):
            getattr(world.store.schedules, verb)(world.alice, theirs)
    assert [s["id"] for s in world.store.schedules.listing(world.alice)] == [mine]
    assert {s["id"] for s in world.store.schedules.listing(world.admin)} == {mine, theirs}


def test_targets_are_checked_when_made_and_at_each_run(world: World) -> None:
    with pytest.raises(Forbidden, match="alice may not run"):
        schedule(world, owner=world.alice)
    with pytest.raises(NotFound, match="no client nowhere"):
        schedule(world, hosts=("nowhere",))
    grant = world.store.directory.add_grant("alice", "run", "web-17", "test")
    sid = schedule(world, owner=world.alice, allow_overlap=True)
    assert world.store.schedules.materialize(now=at(0)) == {"web-17"}
    world.store.directory.remove_grant(grant, "test")
    assert world.store.schedules.materialize(now=at(1)) == set()
    second = world.store.jobs.detail(world.admin, runs(world, sid)[1]["job_id"])
    assert second["assignments"] == []
    assert second["refused"] == ["web-17 (no grant: alice may not run)"]


def test_a_request_key_makes_one_schedule(world: World) -> None:
    key = "5d0c1b8e-2f7a-4e3b-9c6d-1a2b3c4d5e6f"
    when = recurrence.Recurrence.from_request("every", "1m", "UTC", T0.replace(tzinfo=dt.UTC))
    first = world.store.schedules.create(world.admin, spec(), ["web-17"], [], when, request_key=key)
    again = world.store.schedules.create(world.admin, spec(), ["web-17"], [], when, request_key=key)
    assert (again.schedule_id, again.repeated) == (first.schedule_id, True)
    assert len(world.store.schedules.listing(world.admin)) == 1


# --- made once ------------------------------------------------------------------------


def test_a_slot_already_made_is_not_made_again(world: World) -> None:
    """The unique (schedule_id, due_at) holds even when the schedule's row says
    the slot is still due (a daemon that read it before another advanced it)."""
    sid = schedule(world)
    assert world.store.schedules.materialize(now=at(0)) == {"web-17"}
    with world.store.database.tx() as session:
        row = session.get(Schedule, sid)
        assert row is not None
        row.next_due_at = at(0)  # as if the advance had never happened
    assert world.store.schedules.materialize(now=at(0.5)) == set()
    with world.store.database.tx(write=False) as session:
        made = session.query(Job).filter(Job.schedule_id == sid).count()
    assert made == 1


def test_the_timed_task_announces_the_clients_that_got_work(world: World) -> None:
    heard: list[frozenset[str]] = []
    work_due = WorkDue()
    work_due.subscribe(heard.append)
    config = ServerConfig.load(None, state_dir=Path("/nonexistent"))
    schedule(world, hosts=("web-17", "db-1"))
    assert timed.make_due_runs(world.store, config, work_due) == {"web-17", "db-1"}
    assert heard == [frozenset({"web-17", "db-1"})]
    timed.make_due_runs(world.store, config, work_due)  # nothing new due: no announcement
    assert heard == [frozenset({"web-17", "db-1"})]


# --- job retention --------------------------------------------------------------------


def test_a_schedule_whose_old_runs_were_removed_keeps_making_runs(world: World) -> None:
    """Retention removes a schedule's finished runs (an empty one too, by its
    creation time) and keeps the one still pending; the schedule goes on."""
    sid = schedule(world)
    world.store.schedules.materialize(now=at(0))
    world.store.schedules.materialize(now=at(1))  # web-17 busy with the first: an empty run
    first, empty = (r["job_id"] for r in runs(world, sid))
    finish(world, first)
    world.store.schedules.materialize(now=at(2))
    pending = runs(world, sid)[-1]["job_id"]
    counts = world.store.sweeps.purge_jobs(0, now=utcnow() + dt.timedelta(minutes=1))
    assert counts["jobs"] == 2
    assert due_times(world, sid) == [at(2)]
    for gone in (first, empty):
        with pytest.raises(NotFound):
            world.store.jobs.detail(world.admin, gone)
        assert world.store.audit.events(job_id=gone) == []
    assert world.store.jobs.detail(world.admin, pending)["state"] == "pending"
    finish(world, pending)
    assert world.store.schedules.materialize(now=at(3)) == {"web-17"}
    assert due_times(world, sid) == [at(2), at(3)]
    assert world.store.schedules.detail(world.admin, sid)["run_count"] == 2
    assert [s["runs"] for s in world.store.schedules.listing(world.admin) if s["id"] == sid] == [2]
