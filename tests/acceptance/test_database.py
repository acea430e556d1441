"""The database as an operator meets it: PostgreSQL outages answered with fault
10 and one log line, a daemon that waits for its database, an ``init`` that can
be run again, no password in any output, and one daemon per SQLite file."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, Deployment, PostgresCluster, free_port, wait_for

from scire_schema.exitcodes import ExitCode

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def outage_cluster(xprocess: Any) -> Iterator[PostgresCluster]:
    """A PostgreSQL of this module's own, so stopping it hurts no other test."""
    cluster = PostgresCluster(xprocess)
    cluster.sql(f"CREATE ROLE scire LOGIN PASSWORD '{PASSWORD}'")
    try:
        yield cluster
    finally:
        cluster.stop()


def _database_with_password(cluster: PostgresCluster, name: str) -> str:
    cluster.sql(f"CREATE DATABASE {name} OWNER scire")
    return f"postgresql+psycopg://scire:{PASSWORD}@127.0.0.1:{cluster.port}/{name}"


def _server_args(dep: Deployment, *extra: str) -> list[str]:
    return [
        str(BIN / "scire-server"),
        "--state-dir",
        str(dep.state_dir),
        "--listen-port",
        str(dep.port),
        "--instance-key",
        f"test-{dep.port}",
        *(["--database-url", dep.database_url] if dep.database_url else []),
        *extra,
    ]


def test_an_outage_is_fault_10_to_agents_and_admins_and_two_log_lines(
    tmp_path: Path, xprocess: Any, outage_cluster: PostgresCluster
) -> None:
    url = _database_with_password(outage_cluster, "scire_outage")
    dep = Deployment(tmp_path, xprocess, url)
    try:
        dep.start_server("server", "--sweep-interval", "1")
        dep.enroll("host1")
        job = dep.submit("--command", "echo before", "--host", "host1")
        dep.run_agent("host1")
        assert dep.wait_job(job)["state"] == "succeeded"

        outage_cluster.stop_server()
        try:
            for _ in range(3):
                proc = dep.admin_run("job", "list")
                assert proc.returncode == ExitCode.UNREACHABLE, proc.stderr
                assert "database unavailable" in proc.stderr, proc.stderr
                assert "retry after 5 s" in proc.stderr, proc.stderr
                assert "internal error" not in proc.stderr
            agent = dep.agent("host1", "run", timeout=120)
            assert "database unavailable" in agent.stderr, agent.stderr
            assert "internal error" not in agent.stderr and "fault 99" not in agent.stderr
            # The timed tasks (sweep every second) meet the outage too.
            wait_for(
                lambda: dep.server_log().count("database unreachable:") == 1,
                30,
                "the outage line",
            )
        finally:
            outage_cluster.start_server()
        wait_for(lambda: dep.admin_run("job", "list").returncode == 0, 60, "the admin API back")
        wait_for(lambda: "database reachable again after" in dep.server_log(), 30, "the end line")
        job = dep.submit("--command", "echo after", "--host", "host1")
        dep.run_agent("host1")
        assert dep.wait_job(job)["state"] == "succeeded"

        log = dep.server_log()
        assert log.count("database unreachable:") == 1, log
        assert "answering Unavailable until it is back" in log
        assert log.count("database reachable again after") == 1, log
        assert "Traceback" not in log, log
        assert "internal error" not in log and "fault 99" not in log, log
        assert PASSWORD not in log
        assert "postgresql+psycopg://scire:***@127.0.0.1" in log  # the start-up line
    finally:
        for name in list(dep.servers):
            dep.stop_server(name)


def test_a_daemon_started_before_its_database_waits_then_serves(
    tmp_path: Path, xprocess: Any, outage_cluster: PostgresCluster
) -> None:
    url = _database_with_password(outage_cluster, "scire_late")
    dep = Deployment(tmp_path, xprocess, url)
    outage_cluster.stop_server()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            _server_args(dep, "--database-wait", "120"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for(
                lambda: "waiting for the database" in log_path.read_text(), 60, "a waiting line"
            )
        finally:
            outage_cluster.start_server()
        wait_for(lambda: "listening on" in log_path.read_text(), 90, "the daemon to serve")
        assert dep.admin("job", "list") == []
        log = log_path.read_text()
        first = next(line for line in log.splitlines() if "waiting for the database" in line)
        assert f"postgresql+psycopg://scire:***@127.0.0.1:{outage_cluster.port}/scire_late" in first
        assert "next try in" in first
        assert PASSWORD not in log and "Traceback" not in log
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def test_start_up_gives_up_after_database_wait_in_one_line(tmp_path: Path, xprocess: Any) -> None:
    port = free_port()  # nothing listens there
    dep = Deployment(tmp_path, xprocess)
    dep.database_url = f"postgresql+psycopg://scire:{PASSWORD}@127.0.0.1:{port}/scire"
    proc = subprocess.run(
        _server_args(dep, "--database-wait", "3"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == ExitCode.ERROR
    assert "Traceback" not in proc.stderr and PASSWORD not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot start: the database postgresql+psycopg://scire:***@" in last, proc.stderr
    assert "did not answer within 3 s" in last


def _admin_offline(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "scire-admin"), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_init_against_an_unreachable_database_can_be_run_again(
    tmp_path: Path, outage_cluster: PostgresCluster
) -> None:
    state = tmp_path / "server"
    bundle = tmp_path / "admin.pem"
    wrong = f"postgresql+psycopg://scire:{PASSWORD}@127.0.0.1:{free_port()}/scire_init"
    init = ("init", "--state-dir", str(state), "--bundle", str(bundle), "--database-url")
    proc = _admin_offline(tmp_path, *init, wrong)
    assert proc.returncode == ExitCode.ERROR
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot set up the database postgresql+psycopg://scire:***@" in proc.stderr
    assert "nothing was written" in proc.stderr and PASSWORD not in proc.stderr
    assert not (state / "ca.key").exists() and not bundle.exists()

    right = _database_with_password(outage_cluster, "scire_init")
    proc = _admin_offline(tmp_path, "--json", *init, right)
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["database"] == right.replace(PASSWORD, "***")
    assert bundle.exists()

    for command in (("db", "current"), ("db", "upgrade")):
        proc = _admin_offline(
            tmp_path, "--json", *command, "--state-dir", str(state), "--database-url", right
        )
        assert proc.returncode == 0, proc.stderr
        assert PASSWORD not in proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["database"] == right.replace(PASSWORD, "***")
    proc = _admin_offline(
        tmp_path, "db", "current", "--state-dir", str(state), "--database-url", wrong
    )
    assert proc.returncode != 0 and PASSWORD not in proc.stderr and "Traceback" not in proc.stderr

    for url in (right, wrong):
        proc = subprocess.run(
            [str(BIN / "scire-server"), "--state-dir", str(state), "--database-url", url, "check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert PASSWORD not in proc.stdout + proc.stderr
        database = next(line for line in proc.stdout.splitlines() if "database:" in line)
        assert database.startswith("ok " if url == right else "FAIL "), proc.stdout


def test_a_second_daemon_on_one_sqlite_file_is_refused(deployment: Deployment) -> None:
    first = deployment.start_server()
    other_key = f"other-{deployment.port}"
    proc = subprocess.run(
        [
            str(BIN / "scire-server"),
            "--state-dir",
            str(deployment.state_dir),
            "--listen-port",
            str(free_port()),
            "--instance-key",
            other_key,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitCode.INSTANCE_CONFLICT, proc.stderr
    refusal = [line for line in proc.stderr.splitlines() if "refusing to start" in line]
    assert refusal, proc.stderr
    assert f"in use by daemon 'test-{deployment.port}' (pid {first})" in refusal[0]
    assert "SQLite serves one daemon only" in refusal[0]
    # A kill -9'd daemon leaves the lock file but not the lock.
    deployment.stop_server(sig=signal.SIGKILL)
    assert (deployment.state_dir / "scire.db.lock").exists()
    deployment.start_server()
    assert deployment.admin("job", "list") == []
