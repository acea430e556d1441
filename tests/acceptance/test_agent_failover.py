"""Agent and admin failover end to end (issue 9, item 4): a real server, a
"hung" one (a port that accepts connections and never answers) and a dead one
(a port where nothing listens), real ``scire-client`` and ``scire-admin``.
What is asserted is where calls went (logs, the agent's state file, job
results), never how long anything took."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment, _exe, free_port, wait_for

from scire_schema.exitcodes import ExitCode

HOST = "f1"
#: A job that waits for ``go`` in the agent's directory (its cwd is work_root/<id>/work).
WAIT_FOR_GO = "while [ ! -e ../../../go ]; do sleep 0.05; done; echo done"


@pytest.fixture
def hung_url() -> Iterator[str]:
    """A listening socket nobody accepts from: connections queue, TLS never starts."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as sock:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}/"


def dead_url() -> str:
    return f"https://127.0.0.1:{free_port()}/"


def write_config(dep: Deployment, host: str, servers: list[str], **settings: Any) -> Path:
    values = {"servers": ", ".join(servers), "connect_timeout": 2, **settings}
    lines = ["[client]", *(f"{key} = {value}" for key, value in values.items())]
    path = dep.agent_dir(host) / "client.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_command(dep: Deployment, host: str, config: Path, *args: str) -> list[str]:
    return [
        _exe("scire-client"),
        "-c",
        str(config),
        "--state-dir",
        str(dep.agent_dir(host)),
        "--name",
        host,
        *args,
    ]


def run_once(dep: Deployment, host: str, config: Path) -> str:
    proc = subprocess.run(
        agent_command(dep, host, config, "run"), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_a_normal_mode_run_after_a_failover_starts_on_the_good_server(
    running: Deployment, hung_url: str
) -> None:
    dep = running
    dep.enroll(HOST)
    config = write_config(dep, HOST, [hung_url, dep.url])
    first = dep.submit("--host", HOST, "--command", "echo first")
    log = run_once(dep, HOST, config)
    assert f"server {hung_url}" in log and f"using {dep.url}" in log
    state = json.loads((dep.agent_dir(HOST) / "server.json").read_text())
    assert state["server"] == dep.url
    assert dep.job(first)["assignments"][0]["state"] == "succeeded"

    second = dep.submit("--host", HOST, "--command", "echo second")
    log = run_once(dep, HOST, config)
    assert hung_url not in log, "the second run tried the hung server again"
    assert f"server {dep.url}: using it, as since the failover" in log
    assert dep.job(second)["assignments"][0]["state"] == "succeeded"
    assert json.loads((dep.agent_dir(HOST) / "server.json").read_text()) == state


def test_scire_admin_fails_over_and_names_the_servers_it_tried(
    running: Deployment, hung_url: str
) -> None:
    dep = running
    dead = dead_url()
    proc = dep.admin_run(
        "--request-timeout", "2", "client", "list", url=f"{dead},{hung_url},{dep.url}"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert f"using {dep.url}" in proc.stderr
    # The same list in admin.conf, as `server =`.
    conf = dep.root / "admin.conf"
    conf.write_text(f"[admin]\nserver = {dead} {dep.url}\nbundle = {dep.bundle}\n")
    proc = subprocess.run(
        [_exe("scire-admin"), "-c", str(conf), "--json", "job", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    other = dead_url()
    proc = dep.admin_run("job", "list", url=f"{dead},{other}")
    assert proc.returncode == ExitCode.UNREACHABLE
    assert dead in proc.stderr and other in proc.stderr and "no server answered" in proc.stderr


def test_enrollment_fails_over_to_the_next_server(running: Deployment) -> None:
    dep = running
    token = dep.admin("client", "token")["token"]
    proc = subprocess.run(
        [
            _exe("scire-client"),
            "--server",
            f"{dead_url()},{dep.url}",
            "--state-dir",
            str(dep.agent_dir("f2")),
            "--name",
            "f2",
            "--ca-fingerprint",
            dep.ca_fingerprint,
            "--token",
            token,
            "enroll",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (dep.agent_dir("f2") / "cert.pem").exists()


class Gate:
    """A TCP forwarder from a port of its own to the server's, that can be shut
    (connections refused, open ones cut) and opened again on the same port: it
    keeps the daemon from seeing the restarted server until the test is ready."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/"
        self._target = target_port
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self.open()

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def shut(self) -> None:
        assert self._listener is not None
        self._listener.close()
        self._listener = None
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()  # the server is down: so is the way through
                continue
            self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_a_daemon_polls_again_soon_after_its_server_comes_back(deployment: Deployment) -> None:
    """Poll interval 300 s and no poll_now listener: only the backoff after a
    failed poll brings the job submitted while the daemon could not reach its
    (restarting) server within the test's bounds."""
    dep = deployment
    server_config = dep.root / "server.ini"
    server_config.write_text("[server]\npoll_interval = 300\n")
    dep.start_server("server", "-c", str(server_config))
    dep.enroll(HOST)
    gate = Gate(dep.port)
    config = write_config(
        dep,
        HOST,
        [gate.url],
        poll_interval=300,
        poll_jitter=0,
        heartbeat_interval=1,
        report_retry_for=2,
    )
    busy = dep.submit("--host", HOST, "--command", WAIT_FOR_GO)
    log_path = dep.agent_dir(HOST) / "daemon.log"
    with open(log_path, "a", encoding="utf-8") as log:
        daemon = subprocess.Popen(
            agent_command(dep, HOST, config, "-v", "daemon"),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def daemon_log() -> str:
        return log_path.read_text(errors="replace")

    try:
        wait_for(lambda: dep.job(busy)["assignments"][0]["state"] == "running", 60, "the first job")
        gate.shut()
        dep.stop_server("server")
        # A heartbeat finds the server gone; the job then ends while it is away.
        wait_for(lambda: "poll failed" in daemon_log(), 30, "a failed heartbeat")
        (dep.agent_dir(HOST) / "go").touch()
        wait_for(lambda: "report(s) undelivered" in daemon_log(), 30, "an undelivered report")
        dep.start_server("server", "-c", str(server_config))
        after = dep.submit("--host", HOST, "--command", "echo after the restart")
        gate.open()
        final = {"succeeded", "failed", "timed_out", "cancelled", "expired", "denied"}
        row = wait_for(
            lambda: (a := dep.job(after)["assignments"][0])["state"] in final and a,
            120,
            "the job submitted after the restart to run",
        )
        assert (row["state"], row["output"]) == ("succeeded", "after the restart\n")
        assert dep.job(busy)["assignments"][0]["state"] == "succeeded"
        # One warning when the server went away, not one per try.
        assert daemon_log().count("no server answers") == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        print(daemon_log())  # shown when the test fails
