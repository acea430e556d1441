"""The empty poll answered from memory (``poll_cache.IdleClients`` in
``RemoteMethods.poll``), on a real CA and a real SQLite store: an idle
client's empty poll runs no SQL; every way work reaches a client wakes it;
the safety check finds work put in behind the cache's back; and no poll
query walks a host's finished history."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scire_schema import certs, documents, files, protocol
from scire_server import ca, migrations
from scire_server.api import RemoteMethods
from scire_server.config import ServerConfig
from scire_server.exceptions import Forbidden
from scire_server.store import Caller, Store, make_engine
from scire_server.store.database import utcnow


class Statements:
    """Counts the SQL statements the store's engine runs."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1


class Api:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        config = ServerConfig.load(state_dir=tmp_path, **settings)
        ca_key, ca_cert = ca.create_ca()
        files.write_private(config.ca_key_file, certs.key_to_pem(ca_key))
        files.write_public(config.ca_cert_file, certs.cert_to_pem(ca_cert))
        migrations.upgrade(config.database_url)
        self.store = Store(make_engine(config.database_url), "test-server")
        self.store.servers.start(
            "test-server", "localhost", 1, "https://localhost/", 30, lambda _: False
        )
        fingerprint = hashlib.sha256(b"admin").hexdigest()
        self.store.directory.add_user("admin", fingerprint, True, "test")
        self.methods = RemoteMethods(config, self.store)
        self.admin = self.methods.identify(fingerprint)
        self.statements = Statements(self.store.database.engine)

    def enroll(self, name: str) -> tuple[Caller, str]:
        token = self.methods.client_token(self.admin, 1)["token"]
        csr = certs.make_csr(certs.generate_key(), name).decode()
        assert self.methods.register(None, name, csr, {}, token)["status"] == "accepted"
        pem = self.methods.fetch_certificate(None, name, csr)["certificate"]
        fingerprint = certs.fingerprint(certs.load_cert(pem.encode()))
        return self.methods.identify(fingerprint), fingerprint

    def submit(self, host: str, **spec: Any) -> int:
        job_id: int = self.methods.job_submit(
            self.admin, {"script": "true", "hosts": [host], **spec}
        )["job_id"]
        return job_id

    def poll(self, client: Caller, held: list[int] | None = None) -> list[str]:
        jobs: list[str] = self.methods.poll(client, held or [], [], 10)["jobs"]
        return jobs

    def empty_poll_statements(self, client: Caller) -> int:
        before = self.statements.count
        assert self.poll(client) == []
        return self.statements.count - before


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Api]:
    api = Api(tmp_path)
    try:
        yield api
    finally:
        api.store.close()


def _run(server: Api, client: Caller, job_id: int, state: str = "succeeded") -> None:
    """Take the delivered job and report it ended, through the agent's calls."""
    (xml,) = server.poll(client)
    job = documents.parse_job(xml)
    assert job.job_id == job_id
    server.methods.acknowledge(client, [{"job_id": job_id, "delivery_id": job.delivery_id}])
    now = protocol.utc_now()
    report = documents.StatusReport(
        job_id=job_id,
        delivery_id=job.delivery_id,
        state=state,
        exit_code=0 if state == "succeeded" else 1,
        started=now,
        finished=now,
        output="",
    )
    server.methods.report(client, documents.render_status(report))


def test_an_idle_clients_empty_poll_runs_no_sql(server: Api) -> None:
    client, _ = server.enroll("web-17")
    assert server.empty_poll_statements(client) > 0  # the first goes to the database
    assert server.empty_poll_statements(client) == 0
    assert server.empty_poll_statements(client) == 0
    counts = server.methods.idle_clients.snapshot()
    assert counts["answered_from_memory"] == 2
    assert counts["idle_clients"] == 1


def test_a_submission_cancel_and_retry_wake_an_idle_client(server: Api) -> None:
    client, _ = server.enroll("web-17")
    server.poll(client)
    job_id = server.submit("web-17")
    assert len(server.poll(client)) == 1  # the announcement woke it

    # A job it holds: its polls name it, so they go to the database.
    server.methods.job_cancel(server.admin, job_id)
    answer = server.methods.poll(client, [job_id], [], 10)
    assert answer["reconcile"] == [{"job_id": job_id, "action": "cancelled"}]

    job_id = server.submit("web-17", max_attempts=1)
    _run(server, client, job_id, "failed")
    assert server.empty_poll_statements(client) > 0
    assert server.empty_poll_statements(client) == 0  # idle again
    server.methods.job_retry(server.admin, job_id)
    assert len(server.poll(client)) == 1


def test_an_announcement_during_the_database_poll_is_not_lost(
    server: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = server.enroll("web-17")
    real = server.store.assignments.poll
    job_ids: list[int] = []

    def poll_then_submit(*args: Any) -> Any:
        result = real(*args)  # read before the submission committed
        job_ids.append(server.submit("web-17"))
        return result

    monkeypatch.setattr(server.store.assignments, "poll", poll_then_submit)
    assert server.poll(client) == []
    monkeypatch.setattr(server.store.assignments, "poll", real)
    assert len(server.poll(client)) == 1, "the client was marked idle over its new job"


def test_a_relayed_announcement_wakes_it(server: Api) -> None:
    client, _ = server.enroll("web-17")
    server.poll(client)
    job_id = _insert_behind_the_back(server, "web-17")
    assert server.poll(client) == []  # nobody said so: the cache answers
    server.methods.work_due.announce(["web-17"], relayed=True)  # another daemon's
    assert len(server.poll(client)) == 1
    assert job_id


def test_the_safety_check_finds_work_nobody_announced(
    server: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scire_server.poll_cache")
    client, _ = server.enroll("web-17")
    server.poll(client)
    _insert_behind_the_back(server, "web-17")
    assert server.poll(client) == []
    assert server.methods.check_idle_clients() == 1
    assert "client web-17: work found by the poll cache's safety check" in caplog.text
    assert len(server.poll(client)) == 1
    assert server.methods.idle_clients.snapshot()["missed_signals"] == 1


def test_a_job_that_may_not_start_yet_is_claimed_once_it_is_due(server: Api) -> None:
    client, _ = server.enroll("web-17")
    server.poll(client)
    soon = protocol.utc_now() + dt.timedelta(seconds=1.5)
    server.submit("web-17", not_before=protocol.format_time(soon))
    assert server.poll(client) == []
    assert server.empty_poll_statements(client) == 0  # idle, until then
    time.sleep(max(0.0, (soon - protocol.utc_now()).total_seconds()) + 0.2)
    assert len(server.poll(client)) == 1


def test_a_revoked_client_is_refused_though_idle(server: Api) -> None:
    client, fingerprint = server.enroll("web-17")
    server.poll(client)
    server.poll(client)
    server.methods.client_revoke(server.admin, "web-17")
    with pytest.raises(Forbidden, match="revoked"):
        server.methods.identify(fingerprint)


def test_a_changed_presence_goes_to_the_database(server: Api) -> None:
    client, _ = server.enroll("web-17")
    said = {"version": "1.0", "mode": "daemon", "callback": ""}
    server.methods.poll(client, [], [], 10, said)
    before = server.statements.count
    server.methods.poll(client, [], [], 10, said)
    assert server.statements.count == before
    server.methods.poll(client, [], [], 10, said | {"version": "1.1"})
    assert server.statements.count > before
    detail = server.store.directory.client_detail("web-17")
    assert detail["agent_version"] == "1.1"


def test_the_cache_is_off_with_a_zero_check_interval(tmp_path: Path) -> None:
    server = Api(tmp_path, poll_cache_check=0)
    try:
        client, _ = server.enroll("web-17")
        server.poll(client)
        assert server.empty_poll_statements(client) > 0
    finally:
        server.store.close()


def _insert_behind_the_back(server: Api, host: str) -> int:
    """A pending job for ``host`` written straight into the database, announced
    to nobody (as a notification lost between daemons would leave it)."""
    with server.store.database.engine.begin() as connection:
        client_id, owner_id = connection.execute(
            sa.text(
                "SELECT c.id, u.id FROM clients c, users u WHERE c.name = :h AND u.name = 'admin'"
            ),
            {"h": host},
        ).one()
        now = utcnow()
        job_id = connection.execute(
            sa.text(
                "INSERT INTO jobs (name, script, interpreter, privilege, priority, timeout,"
                " output_limit, max_attempts, owner_id, created_at, rerun_on_agent_crash)"
                " VALUES ('behind', 'true', '/bin/sh', 'run', 0, 60, 1000, 1, :o, :t, 0)"
                " RETURNING id"
            ),
            {"o": owner_id, "t": now},
        ).scalar_one()
        connection.execute(
            sa.text(
                "INSERT INTO assignments (job_id, client_id, state, priority, job_created_at,"
                " attempt, retry_base, output_truncated, updated_at)"
                " VALUES (:j, :c, 'pending', 0, :t, 0, 0, 0, :t)"
            ),
            {"j": job_id, "c": client_id, "t": now},
        )
    return int(job_id)


def test_no_poll_query_walks_the_hosts_history(server: Api) -> None:
    """Every statement of a poll that names held and running jobs is served by
    an index that starts with the client's live rows, not a scan of its past."""
    client, _ = server.enroll("web-17")
    job_id = server.submit("web-17")
    _run(server, client, job_id)
    plans: list[str] = []
    engine = server.store.database.engine

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "assignments" in statement:
            rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plans.append(" | ".join(str(row[-1]) for row in rows))

    sa.event.listen(engine, "before_cursor_execute", explain)
    try:
        server.methods.poll(client, [job_id], [job_id + 1], 10)
    finally:
        sa.event.remove(engine, "before_cursor_execute", explain)
    assert plans
    for plan in plans:
        assignments_steps = [step for step in plan.split(" | ") if "assignments" in step]
        assert assignments_steps, plan
        for step in assignments_steps:
            assert step.startswith("SEARCH") and "INDEX" in step, plan
            assert (
                "(client_id=?" in step or "(job_id=? AND client_id=?" in step or "job_id=?" in step
            ), plan
