"""Two real daemons on one real PostgreSQL: a push across daemons, the takeover
of a daemon killed with ``kill -9``, and a schedule that both daemons tick."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment, PostgresCluster, free_port, wait_for

HOST = "d1"
STALE_AFTER = 3  # seconds: the test's instance_stale_after (heartbeat 1 s, sweep 1 s)


class Pair:
    """Daemons ``a`` (the deployment's port) and ``b`` on one database."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.port_b = free_port()
        self.url_b = f"https://127.0.0.1:{self.port_b}/"
        config = dep.root / "server.ini"
        config.write_text("[server]\npoll_interval = 300\n")
        fast = (
            "-c",
            str(config),
            "--heartbeat-interval",
            "1",
            "--instance-stale-after",
            str(STALE_AFTER),
            "--sweep-interval",
            "1",
        )
        dep.start_server("a", *fast, instance_key="a")
        dep.start_server("b", *fast, port=self.port_b, instance_key="b")
        self.agents: list[subprocess.Popen[str]] = []

    def admin_b(self, *args: str) -> Any:
        proc = self.dep.admin_run(*args, url=self.url_b)
        assert proc.returncode == 0, f"scire-admin {' '.join(args)}: {proc.stderr}"
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def servers(self) -> dict[str, dict[str, Any]]:
        return {row["instance_key"]: row for row in self.admin_b("server", "list")}

    def daemon_agent_on_b(self, host: str) -> Path:
        """A daemon-mode agent (poll interval 300 s) that knows daemon ``b`` only."""
        self.dep.enroll(host)
        values = {
            "poll_interval": 300,
            "poll_jitter": 0,
            "heartbeat_interval": 300,
            "listen": f"127.0.0.1:{free_port()}",
        }
        lines = ["[client]", *(f"{key} = {value}" for key, value in values.items())]
        config = self.dep.agent_dir(host) / "client.ini"
        config.write_text("\n".join(lines) + "\n")
        args = self.dep.agent_args(host, "-c", str(config), "-v", "daemon")
        args[args.index(self.dep.url)] = self.url_b
        log = self.dep.agent_dir(host) / "daemon.log"
        with open(log, "a", encoding="utf-8") as out:
            self.agents.append(
                subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True)
            )
        wait_for(lambda: "daemon started" in log.read_text(), 30, f"{host} to start")
        return log

    def close(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait(30)


@pytest.fixture
def pair(
    tmp_path: Path, xprocess: Any, postgres: PostgresCluster, postgres_url: str
) -> Iterator[Pair]:
    dep = Deployment(tmp_path, xprocess, database_url=postgres_url)
    made = Pair(dep)
    try:
        yield made
    finally:
        made.close()
        for name in list(dep.servers):
            try:
                dep.stop_server(name)
            except AssertionError:
                dep.stop_server(name, signal.SIGKILL)


def _assignment(pair: Pair, job_id: int) -> dict[str, Any]:
    (row,) = pair.admin_b("job", "show", str(job_id))["assignments"]
    return dict(row)


def test_a_job_submitted_through_a_wakes_an_agent_attached_to_b(pair: Pair) -> None:
    log = pair.daemon_agent_on_b(HOST)
    wait_for(
        lambda: any(
            c["name"] == HOST and c["agent_mode"] == "daemon" and c["callback_address"]
            for c in pair.dep.admin("client", "list")
        ),
        30,
        "daemon a to learn the agent's callback",
    )
    # The agent polls every 300 s and only daemon b: only a push starts this job in time.
    job = pair.dep.submit("--host", HOST, "--command", "echo across")
    row = wait_for(
        lambda: (a := _assignment(pair, job))["state"] == "succeeded" and a,
        60,
        "the job to run",
    )
    assert row["output"] == "across\n"
    assert "(poll_now)" in log.read_text()


def test_kill_9_of_a_daemon_shows_it_dead_on_the_other_and_returns_its_leases(
    pair: Pair,
) -> None:
    pair.dep.enroll(HOST)
    job = pair.dep.submit("--host", HOST, "--command", "true", "--max-attempts", "3")
    rows = pair.servers()
    assert rows["a"]["state"] == rows["b"]["state"] == "running"
    assert rows["a"]["heartbeat_age"] <= STALE_AFTER
    # The agent takes the job from daemon a and never acknowledges it.
    lease = _lease_from_a(pair, job)
    assert lease["state"] == "sent"
    pair.dep.stop_server("a", signal.SIGKILL)
    wait_for(lambda: pair.servers()["a"]["state"] == "dead", 60, "daemon a to be marked dead")
    assert pair.servers()["b"]["state"] == "running"
    assert pair.servers()["a"]["heartbeat_age"] >= STALE_AFTER
    assert _assignment(pair, job)["state"] == "pending"
    events = [e for e in pair.admin_b("audit", "--limit", "500") if e["action"] == "takeover"]
    assert len(events) == 1
    assert "b took over a" in events[0]["detail"]
    assert "leases returned=1" in events[0]["detail"]


def _lease_from_a(pair: Pair, job: int) -> dict[str, Any]:
    """Poll daemon a as the agent, without acknowledging: a lease daemon a holds."""
    import xmlrpc.client

    from scire_schema import tls

    agent_dir = pair.dep.agent_dir(HOST)
    cert, key = _agent_identity(agent_dir)
    proxy = xmlrpc.client.ServerProxy(
        pair.dep.url,
        transport=tls.TLSTransport(
            tls.client_context(pair.dep.state_dir / "ca.pem", cert, key), 30
        ),
        allow_none=True,
    )
    try:
        answer = proxy.agent.poll([], [], 1, None)
    finally:
        proxy("close")()
    assert len(answer["jobs"]) == 1
    return _assignment(pair, job)


def _agent_identity(agent_dir: Path) -> tuple[Path, Path]:
    """The enrolled agent's certificate and key files in its state directory."""
    return agent_dir / "cert.pem", agent_dir / "key.pem"


def test_a_schedule_on_two_daemons_makes_each_run_once(pair: Pair) -> None:
    pair.dep.enroll(HOST)
    sid = pair.dep.admin("job", "submit", "--host", HOST, "--command", "true", "--every", "1s")[
        "schedule_id"
    ]
    wait_for(
        lambda: pair.admin_b("schedule", "show", str(sid))["run_count"] >= 8,
        120,
        "eight runs",
    )
    pair.admin_b("schedule", "pause", str(sid))
    runs = pair.admin_b("schedule", "show", str(sid))["runs"]
    due = [r["due_at"] for r in runs]
    assert len(due) == len(set(due)) >= 8
    assert len({r["job_id"] for r in runs}) == len(runs)


def test_a_client_revoked_through_a_is_refused_by_b_at_once(pair: Pair) -> None:
    """B remembers the agent's certificate from its first call; the revocation
    made on A reaches B through the relay before the agent's next call."""
    pair.dep.enroll(HOST)
    args = pair.dep.agent_args(HOST, "run", servers=[pair.url_b])
    for _ in range(2):  # the second call is answered from what b remembers
        first = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
    pair.dep.admin("client", "revoke", HOST)
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "revoked" in refused.stderr
