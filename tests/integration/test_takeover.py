"""Several daemons on one PostgreSQL: the takeover of a daemon whose heartbeat
went stale, and the advisory lock that keeps a timed task on one daemon."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import replace

from sqlalchemy import update

from scire_schema import certs
from scire_server import ca, migrations, store
from scire_server.models import Assignment, Server
from scire_server.states import ServerState, State
from scire_server.store import Caller, Certificate, JobSpec, Store, Takeover, utcnow

STALE_AFTER = 30


def _daemon(url: str, name: str, pid: int) -> Store:
    db = Store(store.make_engine(url), name)
    db.servers.start(name, "host", pid, f"https://{name}/", STALE_AFTER, is_alive=lambda _: True)
    return db


def _seed(db: Store) -> tuple[Caller, Caller]:
    ca_key, ca_cert = ca.create_ca()
    user_cert = ca.sign_csr(
        ca_key, ca_cert, certs.make_csr(certs.generate_key(), "root"), "root", ca.ROLE_USER
    )
    db.directory.add_user("root", certs.fingerprint(user_cert), True, "test")
    csr = certs.make_csr(certs.generate_key(), "host0").decode()
    db.directory.register_client(
        "host0", csr, {}, None, key_fingerprint=certs.key_fingerprint(certs.load_csr(csr))
    )
    cert = ca.sign_csr(ca_key, ca_cert, csr, "host0", ca.ROLE_CLIENT)
    db.directory.accept_client(
        "host0", Certificate(csr, certs.cert_to_pem(cert).decode(), certs.fingerprint(cert)), "test"
    )
    client, _ = db.directory.caller_by_fingerprint(certs.fingerprint(cert))
    owner, _ = db.directory.caller_by_fingerprint(certs.fingerprint(user_cert))
    assert client is not None and owner is not None
    return owner, client


def _silence(db: Store, seconds: int) -> None:
    """Age this daemon's heartbeat, as if it had hung ``seconds`` ago."""
    with db.database.tx() as session:
        session.execute(
            update(Server)
            .where(Server.id == db.database.server_id)
            .values(heartbeat_at=utcnow() - dt.timedelta(seconds=seconds))
        )


def _states(db: Store) -> dict[int, str]:
    with db.database.tx(write=False) as session:
        return dict(session.query(Assignment.job_id, Assignment.state).all())


def test_of_two_survivors_exactly_one_takes_over_a_silent_daemon(postgres_url: str) -> None:
    migrations.upgrade(postgres_url)
    hung = _daemon(postgres_url, "a", 101)
    survivors = [_daemon(postgres_url, "b", 102), _daemon(postgres_url, "c", 103)]
    owner, client = _seed(hung)
    spec = JobSpec(script="true", name="j", timeout=60, output_limit=1024, max_attempts=3)
    ids = [hung.jobs.submit(owner, spec, ["host0"], []).job_id for _ in range(4)]
    delivered = hung.assignments.poll(client, [], [], 10, 600).deliveries
    assert {d.job_id for d in delivered} == set(ids)
    _silence(hung, STALE_AFTER + 5)

    # A fresh daemon is never taken over.
    assert survivors[0].sweeps.take_over(STALE_AFTER + 60) == []
    results: list[list[Takeover]] = []
    barrier = threading.Barrier(len(survivors))

    def sweep(db: Store) -> None:
        barrier.wait()
        results.append(db.sweeps.take_over(STALE_AFTER))

    threads = [threading.Thread(target=sweep, args=(db,)) for db in survivors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    takeovers = [t for result in results for t in result]
    assert len(takeovers) == 1
    (takeover,) = takeovers
    assert takeover.instance_key == "a"
    assert takeover.silent_for >= STALE_AFTER
    assert dict(takeover.leases) == {"returned": 4, "undeliverable": 0}
    assert takeover.leases.due == frozenset({"host0"})
    rows = {r["instance_key"]: r for r in survivors[0].servers.listing()}
    assert rows["a"]["state"] == ServerState.DEAD
    assert rows["a"]["heartbeat_age"] >= STALE_AFTER
    assert rows["b"]["state"] == rows["c"]["state"] == ServerState.RUNNING
    assert set(_states(hung).values()) == {State.PENDING.value}
    events = [e for e in hung.audit.events() if e["action"] == "takeover"]
    assert len(events) == 1
    assert "over a (no heartbeat for" in events[0]["detail"]
    assert "leases returned=4" in events[0]["detail"]
    # Nothing left to take over on the next sweep.
    assert survivors[0].sweeps.take_over(STALE_AFTER) == []
    for db in (hung, *survivors):
        db.close()


def test_a_hung_daemon_waking_up_after_a_takeover_cannot_heartbeat_its_row_back(
    postgres_url: str,
) -> None:
    migrations.upgrade(postgres_url)
    hung, survivor = _daemon(postgres_url, "a", 101), _daemon(postgres_url, "b", 102)
    owner, client = _seed(hung)
    spec = JobSpec(script="true", name="j", timeout=60, output_limit=1024, max_attempts=3)
    first = hung.jobs.submit(owner, spec, ["host0"], []).job_id
    second = hung.jobs.submit(owner, replace(spec, priority=5), ["host0"], []).job_id
    stale = {
        d.job_id: d.delivery_id for d in hung.assignments.poll(client, [], [], 10, 600).deliveries
    }
    _silence(hung, STALE_AFTER + 5)
    assert len(survivor.sweeps.take_over(STALE_AFTER)) == 1

    assert hung.servers.heartbeat() is False
    assert hung.servers.state() == ServerState.DEAD
    # The survivor hands the second job out again: a new delivery.
    again = survivor.assignments.poll(client, [first], [], 1, 600).deliveries
    assert [d.job_id for d in again] == [second]
    assert again[0].delivery_id != stale[second]
    # The agent's late acknowledgement of the first delivery is still the
    # current delivery (pending, not handed out again): it keeps it. The one
    # for the second is stale and refused, so the job runs once.
    acked = survivor.assignments.acknowledge(
        client, [(first, stale[first]), (second, stale[second])]
    )
    assert acked.kept == [first]
    assert _states(survivor) == {first: State.ACKNOWLEDGED.value, second: State.SENT.value}

    # The hung daemon registers again (the key's row says dead, not live).
    previous = hung.servers.start("a", "host", 101, "https://a/", STALE_AFTER, lambda _: True)
    assert previous["previous_state"] == ServerState.DEAD
    assert hung.servers.heartbeat() is True
    rows = {r["instance_key"]: r["state"] for r in survivor.servers.listing()}
    assert rows == {"a": ServerState.RUNNING, "b": ServerState.RUNNING}
    hung.close()
    survivor.close()


def test_a_stopped_daemon_is_not_taken_over(postgres_url: str) -> None:
    migrations.upgrade(postgres_url)
    stopped, survivor = _daemon(postgres_url, "a", 101), _daemon(postgres_url, "b", 102)
    stopped.servers.stop()
    _silence(stopped, STALE_AFTER + 5)
    assert survivor.sweeps.take_over(STALE_AFTER) == []
    rows = {r["instance_key"]: r["state"] for r in survivor.servers.listing()}
    assert rows["a"] == ServerState.STOPPED
    stopped.close()
    survivor.close()


def test_a_task_under_the_advisory_lock_runs_on_one_daemon_at_a_time(postgres_url: str) -> None:
    from scire_server import timed

    migrations.upgrade(postgres_url)
    first, second = _daemon(postgres_url, "a", 101), _daemon(postgres_url, "b", 102)
    ran: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def long_run() -> None:
        ran.append("a")
        inside.set()
        assert release.wait(60)

    thread = threading.Thread(
        target=timed.one_daemon_at_a_time, args=(first, "retention", long_run)
    )
    thread.start()
    assert inside.wait(60)
    # While the first daemon runs it the second skips its tick; another task is not held up.
    assert timed.one_daemon_at_a_time(second, "retention", lambda: ran.append("b")) is False
    assert timed.one_daemon_at_a_time(second, "other", lambda: ran.append("b-other")) is True
    release.set()
    thread.join(60)
    # Once done, the lock is free for the next tick of either daemon.
    assert timed.one_daemon_at_a_time(second, "retention", lambda: ran.append("b")) is True
    assert ran == ["a", "b-other", "b"]
    first.close()
    second.close()


# --- the relay between daemons ---------------------------------------------------------


class _Heard:
    def __init__(self) -> None:
        self.names: set[str] = set()
        self.changed = threading.Condition()

    def __call__(self, names: frozenset[str]) -> None:
        with self.changed:
            self.names |= names
            self.changed.notify_all()

    def wait_for(self, names: set[str]) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: names <= self.names, timeout=30)


def test_an_announcement_on_one_daemon_reaches_the_other_once_and_is_not_echoed(
    postgres_url: str,
) -> None:
    from scire_server.relay import Relay
    from scire_server.work_due import WorkDue

    migrations.upgrade(postgres_url)
    stores = [_daemon(postgres_url, "a", 101), _daemon(postgres_url, "b", 102)]
    signals = [WorkDue(), WorkDue()]
    relays = [
        Relay(db, due, db.database.server_name) for db, due in zip(stores, signals, strict=True)
    ]
    everything = [_Heard(), _Heard()]
    own_only = [_Heard(), _Heard()]
    for due, heard, local in zip(signals, everything, own_only, strict=True):
        due.subscribe(heard)
        due.subscribe(local, relayed=False)
    for relay in relays:
        assert relay.start()

    many = {f"host-{i:05d}.example.org" for i in range(2000)}
    signals[0].announce(many | {"web1"})
    assert everything[1].wait_for(many | {"web1"})
    assert own_only[1].names == set()  # the pusher's kind: the origin pushes
    signals[1].announce({"db1"})
    assert everything[0].wait_for({"db1"})
    # Neither heard its own announcement back from the other (no echo, no loop).
    assert everything[0].names == many | {"web1", "db1"}
    assert everything[1].names == many | {"web1", "db1"}
    assert own_only[0].names == many | {"web1"}
    for relay in relays:
        relay.close()
    for db in stores:
        db.close()


def test_the_relay_listens_again_after_losing_its_connection_and_catches_up(
    postgres_url: str,
) -> None:
    from sqlalchemy import text

    from scire_server.relay import Relay
    from scire_server.work_due import WorkDue

    migrations.upgrade(postgres_url)
    db, other = _daemon(postgres_url, "a", 101), _daemon(postgres_url, "b", 102)
    owner, _client = _seed(db)
    due = WorkDue()
    heard = _Heard()
    due.subscribe(heard)
    relay = Relay(db, due, "a")
    assert relay.start()
    # Work made due without a notification (as if sent while the relay was
    # not listening), then the listening connection cut off, as a database
    # restart would.
    other.jobs.submit(owner, JobSpec(script="true", name="j"), ["host0"], [])
    assert heard.names == set()
    with other.database.tx() as session:
        session.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        )
    # After reconnecting it announces every client with due work.
    assert heard.wait_for({"host0"})
    other_due = WorkDue()
    other_relay = Relay(other, other_due, "b")
    assert other_relay.start()
    other_due.announce({"later"})
    assert heard.wait_for({"later"})
    relay.close()
    other_relay.close()
    db.close()
    other.close()
