"""Push to daemon-mode agents and presence, against a real server process.

The agent here is a stand-in (``tests/fake_agent.py``): a real TLS listener
from ``scire_schema.listener`` with a client certificate the server issued by
enrollment, which polls over XML-RPC with its ``presence`` and counts the
``poll_now`` calls it gets. (The real daemon-mode agent has its own tests.)
"""

from __future__ import annotations

import re
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment, _exe
from fake_agent import FakeAgent, SilentListener, dead_address, fingerprint_of, write_identity

from scire_schema import certs, documents, tls

VERSION = "9.9.9-test"


class Host:
    """An enrolled client: its certificate, its XML-RPC proxy, maybe a listener."""

    def __init__(self, dep: Deployment, name: str) -> None:
        self.dep = dep
        self.name = name
        ca_file = dep.state_dir / "ca.pem"
        token = dep.admin("client", "token")["token"]
        key = certs.generate_key()
        csr = certs.make_csr(key, name).decode()
        enrolling = xmlrpc.client.ServerProxy(
            dep.url, transport=tls.TLSTransport(tls.client_context(ca_file), 30)
        )
        assert enrolling.agent.register(name, csr, {}, token)["status"] == "accepted"
        cert_pem = enrolling.agent.fetch_certificate(name, csr)["certificate"]
        enrolling("close")()
        self.cert, self.key = write_identity(
            dep.root / "hosts", name, cert_pem.encode(), certs.key_to_pem(key)
        )
        self.proxy = xmlrpc.client.ServerProxy(
            dep.url,
            transport=tls.TLSTransport(tls.client_context(ca_file, self.cert, self.key), 30),
            allow_none=True,
        )
        self.listener: FakeAgent | None = None

    def listen(self, cert: Path | None = None, key: Path | None = None) -> FakeAgent:
        """A poll_now listener, with this host's certificate unless told otherwise."""
        self.listener = FakeAgent(
            cert or self.cert, key or self.key, self.dep.state_dir / "ca.pem"
        ).start()
        return self.listener

    def poll(self, callback: str, mode: str = "daemon", limit: int = 0) -> dict[str, Any]:
        presence = {"version": VERSION, "mode": mode, "callback": callback}
        answer: dict[str, Any] = self.proxy.agent.poll([], [], limit, presence)
        return answer

    def close(self) -> None:
        self.proxy("close")()
        if self.listener is not None:
            self.listener.stop()


@pytest.fixture
def hosts(deployment: Deployment) -> Iterator[dict[str, Host]]:
    made: dict[str, Host] = {}
    try:
        yield made
    finally:
        for host in made.values():
            host.close()


def host(dep: Deployment, hosts: dict[str, Host], name: str) -> Host:
    hosts[name] = Host(dep, name)
    return hosts[name]


def admin_proxy(dep: Deployment) -> Any:
    context = tls.client_context(dep.state_dir / "ca.pem", dep.bundle, dep.bundle)
    return xmlrpc.client.ServerProxy(
        dep.url, transport=tls.TLSTransport(context, 30), allow_none=True
    )


def log_line(dep: Deployment, pattern: str, timeout: float = 30.0) -> str:
    """The first server log line matching ``pattern``, once it is written."""
    deadline = time.monotonic() + timeout
    while True:
        for line in dep.server_log().splitlines():
            if re.search(pattern, line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matches {pattern!r}")
        time.sleep(0.05)


def test_a_submission_pushes_poll_now_to_a_daemon_mode_agent(
    deployment: Deployment, hosts: dict[str, Host]
) -> None:
    dep = deployment
    dep.start_server()
    web = host(dep, hosts, "web-1")
    agent = web.listen()
    assert web.poll(agent.callback)["jobs"] == []
    job_id = dep.submit("--host", "web-1", "--command", "true")
    assert agent.wait_for_answers(1)
    # Called with the server's own certificate, the one a listener requires.
    assert agent.callers == [fingerprint_of(dep.state_dir / "server.pem")]
    (job_xml,) = web.poll(agent.callback, limit=10)["jobs"]
    assert documents.parse_job(job_xml).job_id == job_id


def test_a_burst_of_submissions_gives_few_pushes(
    deployment: Deployment, hosts: dict[str, Host]
) -> None:
    dep = deployment
    # The first push is held by the agent (a busy host) long enough for the burst.
    dep.start_server("server", "--push-timeout", "30")
    web = host(dep, hosts, "web-1")
    agent = web.listen()
    web.poll(agent.callback)
    agent.hold()
    admin = admin_proxy(dep)
    try:
        spec = {"script": "true", "hosts": ["web-1"]}
        admin.admin.job_submit(spec)
        assert agent.wait_for_calls(1)
        for _ in range(49):
            admin.admin.job_submit(spec)
    finally:
        admin("close")()
    agent.release()
    assert agent.wait_for_answers(2)
    # The one follow-up push's poll takes all 50.
    assert len(web.poll(agent.callback, limit=100)["jobs"]) == 50
    dep.stop_server()  # the pusher's last line sums up what it did
    summary = log_line(dep, r"pusher stopped: ")
    assert "announced=50," in summary
    assert "sent=2," in summary, summary
    assert len(agent.callers) == 2


@pytest.mark.parametrize("dead", ["nothing listens", "never answers"])
def test_a_dead_agent_costs_a_counted_failure_and_gets_the_job_at_its_next_poll(
    deployment: Deployment, hosts: dict[str, Host], dead: str
) -> None:
    dep = deployment
    dep.start_server()
    web = host(dep, hosts, "web-1")
    silent = SilentListener() if dead == "never answers" else None
    callback = silent.callback if silent else dead_address()
    try:
        web.poll(callback)
        proc = dep.admin_run("job", "submit", "--host", "web-1", "--command", "true")
        assert proc.returncode == 0, proc.stderr  # the submission completed, push or not
        why = "connection refused" if silent is None else "did not answer within 2 s"
        line = log_line(dep, r"push from .* to client web-1 at .* failed")
        assert f"at {callback} failed: " in line and why in line, line
        assert line.endswith("it gets its work at its next poll")
    finally:
        if silent is not None:
            silent.close()
    # The poll is the safety net.
    assert len(web.poll(callback, limit=10)["jobs"]) == 1


def test_the_push_checks_the_agents_certificate(
    deployment: Deployment, hosts: dict[str, Host]
) -> None:
    dep = deployment
    dep.start_server()
    web = host(dep, hosts, "web-1")
    db = host(dep, hosts, "db-1")
    impostor = web.listen(db.cert, db.key)  # web-1's address answers with db-1's certificate
    web.poll(impostor.callback)
    dep.submit("--host", "web-1", "--command", "true")
    line = log_line(dep, r"push from .* to client web-1 .* failed")
    assert f"presented certificate {fingerprint_of(db.cert)}" in line
    assert "not the one on record for web-1" in line
    assert impostor.callers == []


def test_push_off_pushes_nothing(deployment: Deployment, hosts: dict[str, Host]) -> None:
    dep = deployment
    dep.start_server("server", "--push", "off")
    web = host(dep, hosts, "web-1")
    agent = web.listen()
    web.poll(agent.callback)
    dep.submit("--host", "web-1", "--command", "true")
    dep.stop_server()  # whatever was announced would have been pushed by now
    assert log_line(dep, r"listening on https://").endswith(", push off")
    assert agent.callers == []


def test_client_list_shows_presence_and_filters(
    deployment: Deployment, hosts: dict[str, Host]
) -> None:
    dep = deployment
    dep.start_server()
    web = host(dep, hosts, "web-1")
    host(dep, hosts, "db-1")  # enrolled, never polled
    web.poll("127.0.0.1:8444")
    dep.admin("group", "create", "web")
    dep.admin("group", "create", "all")
    dep.admin("group", "add", "web", "web-1")
    dep.admin("group", "add", "all", "@web", "db-1")

    listed = {c["name"]: c for c in dep.admin("client", "list")}
    assert (listed["web-1"]["online"], listed["web-1"]["agent_mode"]) == (True, "daemon")
    assert listed["web-1"]["agent_version"] == VERSION
    assert listed["web-1"]["callback_address"] == "127.0.0.1:8444"
    assert (listed["db-1"]["online"], listed["db-1"]["agent_mode"]) == (False, None)
    assert [c["name"] for c in dep.admin("client", "list", "--offline")] == ["db-1"]
    assert [c["name"] for c in dep.admin("client", "list", "--group", "web")] == ["web-1"]
    assert [c["name"] for c in dep.admin("client", "list", "--group", "@all")] == [
        "db-1",
        "web-1",
    ]
    assert [c["name"] for c in dep.admin("client", "list", "--group", "all", "--offline")] == [
        "db-1"
    ]
    shown = dep.admin("client", "show", "web-1")
    assert (shown["online"], shown["agent_mode"], shown["agent_version"]) == (
        True,
        "daemon",
        VERSION,
    )

    table = subprocess.run(
        [_exe("scire-admin"), "--server", dep.url, "--bundle", str(dep.bundle), "client", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    text = table.stdout.splitlines()
    header = text[0].split()
    assert header[:5] == ["NAME", "STATUS", "ACTIVE_JOBS", "LAST_SEEN_AT", "REGISTERED_AT"]
    assert header[5:8] == ["PRESENCE", "MODE", "VERSION"]
    rows = {line.split()[0]: line.split() for line in text[1:]}
    assert rows["web-1"][:2] == ["web-1", "accepted"]
    assert {"online", "daemon", VERSION} <= set(rows["web-1"])
    assert {"offline"} <= set(rows["db-1"])
    unknown = dep.admin_fails("client", "list", "--group", "nope")
    assert "no client group nope" in unknown
