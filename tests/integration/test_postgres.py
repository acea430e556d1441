"""The store on a real PostgreSQL: migrations, and the claim race between daemons."""

from __future__ import annotations

import threading
import time

from scire_schema import certs
from scire_server import ca, migrations, store
from scire_server.store import Caller, Certificate, JobSpec, Store, SubmitResult, utcnow


def _store(url: str, name: str) -> Store:
    return Store(store.make_engine(url), name)


def _seed(db: Store, clients: int) -> tuple[Caller, list[Caller]]:
    key = certs.generate_key()
    ca_key, ca_cert = ca.create_ca()
    user_cert = ca.sign_csr(ca_key, ca_cert, certs.make_csr(key, "root"), "root", ca.ROLE_USER)
    db.directory.add_user("root", certs.fingerprint(user_cert), True, "test")
    callers = []
    for i in range(clients):
        name = f"host{i}"
        csr = certs.make_csr(certs.generate_key(), name).decode()
        db.directory.register_client(
            name, csr, {}, None, key_fingerprint=certs.key_fingerprint(certs.load_csr(csr))
        )
        cert = ca.sign_csr(ca_key, ca_cert, csr, name, ca.ROLE_CLIENT)
        certificate = Certificate(csr, certs.cert_to_pem(cert).decode(), certs.fingerprint(cert))
        db.directory.accept_client(name, certificate, "test")
        caller, _ = db.directory.caller_by_fingerprint(certs.fingerprint(cert))
        assert caller is not None
        callers.append(caller)
    owner, _ = db.directory.caller_by_fingerprint(certs.fingerprint(user_cert))
    assert owner is not None
    return owner, callers


def _spec(name: str, priority: int = 0) -> JobSpec:
    return JobSpec(script="true", name=name, priority=priority, timeout=60, output_limit=1024)


def test_migrations_match_models_on_postgres(postgres_url: str) -> None:
    from alembic import command

    migrations.upgrade(postgres_url)
    command.check(migrations.alembic_config(postgres_url))


def test_two_daemons_never_claim_the_same_assignment(postgres_url: str) -> None:
    migrations.upgrade(postgres_url)
    first, second = _store(postgres_url, "a"), _store(postgres_url, "b")
    owner, (client,) = _seed(first, 1)
    for i in range(40):
        first.jobs.submit(owner, _spec(f"job{i}", priority=i % 3), ["host0"], [])
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    def poll(db: Store, key: str) -> None:
        while True:
            result = db.assignments.poll(client, [], [], 3, 60)
            if not result.deliveries:
                return
            claimed[key].extend(d.job_id for d in result.deliveries)

    threads = [
        threading.Thread(target=poll, args=(db, key)) for db, key in ((first, "a"), (second, "b"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = claimed["a"] + claimed["b"]
    assert sorted(everything) == list(range(1, 41))
    assert len(set(everything)) == len(everything)
    first.close()
    second.close()


def test_poll_order_on_postgres(postgres_url: str) -> None:
    migrations.upgrade(postgres_url)
    db = _store(postgres_url, "a")
    owner, (client,) = _seed(db, 1)
    low = db.jobs.submit(owner, _spec("low", 1), ["host0"], []).job_id
    high = db.jobs.submit(owner, _spec("high", 9), ["host0"], []).job_id
    mid = db.jobs.submit(owner, _spec("mid", 5), ["host0"], []).job_id
    result = db.assignments.poll(client, [], [], 10, 60)
    assert [d.job_id for d in result.deliveries] == [high, mid, low]
    db.close()


def test_a_submission_racing_a_committing_one_with_the_same_key_answers_with_it(
    postgres_url: str,
) -> None:
    """The loser's insert waits on the winner's uncommitted row, fails once it
    commits, and answers with the winner's job instead of a second one."""
    import psycopg

    from scire_server.models import Job

    migrations.upgrade(postgres_url)
    first, second = _store(postgres_url, "a"), _store(postgres_url, "b")
    owner, _ = _seed(first, 1)
    spec = _spec("once")
    key = "3b9d6c0e-7a51-4c1f-8e2d-5f0a9b8c7d6e"
    answers: list[SubmitResult] = []
    errors: list[BaseException] = []

    def loser() -> None:
        try:
            answers.append(second.jobs.submit(owner, spec, ["host0"], [], key))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=loser)
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with first.database.tx() as session, psycopg.connect(dsn, autocommit=True) as watcher:
        winner = Job(owner_id=owner.id, created_at=utcnow(), request_key=key, **vars(spec))
        session.add(winner)
        session.flush()
        thread.start()
        # Commit only once the loser's insert waits for our row's lock.
        deadline = time.monotonic() + 60
        while not watcher.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the second submission never waited"
            time.sleep(0.05)
    thread.join(60)
    assert errors == []
    (answer,) = answers
    assert (answer.job_id, answer.repeated) == (winner.id, True)
    assert [j["id"] for j in first.jobs.listing(owner)] == [winner.id]
    first.close()
    second.close()


def test_two_daemons_hammering_the_schedules_make_each_run_once(postgres_url: str) -> None:
    """Eight threads on two stores (two daemons) tick the same schedules over the
    same ten seconds; every (schedule, due time) is made exactly once."""
    import datetime as dt

    from scire_schema.protocol import CatchUp
    from scire_server import recurrence
    from scire_server.models import Job

    migrations.upgrade(postgres_url)
    first, second = _store(postgres_url, "a"), _store(postgres_url, "b")
    owner, _ = _seed(first, 1)
    start = utcnow().replace(microsecond=0)
    when = recurrence.Recurrence.from_request("every", "1s", "UTC", start.replace(tzinfo=dt.UTC))
    ids = [
        first.schedules.create(
            owner, _spec(f"every-{i}"), ["host0"], [], when, True, CatchUp.ALL
        ).schedule_id
        for i in range(10)
    ]
    errors: list[BaseException] = []

    def tick(db: Store) -> None:
        try:
            for half_seconds in range(21):
                db.schedules.materialize(now=start + dt.timedelta(seconds=half_seconds / 2))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=tick, args=(db,)) for db in (first, second) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with first.database.tx(write=False) as session:
        made = session.query(Job.schedule_id, Job.due_at).filter(Job.schedule_id.in_(ids)).all()
    expected = {(sid, start + dt.timedelta(seconds=s)) for sid in ids for s in range(11)}
    assert len(made) == len(expected)
    assert set(made) == expected
    first.close()
    second.close()
