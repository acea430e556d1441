"""Daemon mode end to end: a real server, real ``scire-client daemon`` processes,
``poll_now`` over real TLS with the test CA's certificates, signals and kill -9.

The server suggests a 300 s poll interval, so within these tests' bounds a job
only runs early because of a hint, a heartbeat or a (re)start."""

from __future__ import annotations

import http.client
import json
import signal
import ssl
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment, free_port, wait_for

from scire_schema import tls

HOST = "d1"
#: A job that waits for ``go`` in the agent's directory (its cwd is work_root/<id>/work).
WAIT_FOR_GO = "echo started; while [ ! -e ../../../go ]; do sleep 0.05; done; echo done"


class DaemonRig:
    """One server (poll interval 300 s) and enrolled agents run as daemons."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        config = dep.root / "server.ini"
        config.write_text("[server]\npoll_interval = 300\n")
        dep.start_server("server", "-c", str(config))
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def enroll(self, host: str, **settings: object) -> None:
        self.dep.enroll(host)
        self.ports[host] = free_port()
        values = {
            "poll_interval": 300,
            "poll_jitter": 0,
            "heartbeat_interval": 300,
            "kill_grace": 1,
            "report_retry_for": 2,
            "listen": f"127.0.0.1:{self.ports[host]}",
            **settings,
        }
        lines = ["[client]", *(f"{key} = {value}" for key, value in values.items())]
        (self.dep.agent_dir(host) / "client.ini").write_text("\n".join(lines) + "\n")

    def log_path(self, host: str) -> Path:
        return self.dep.agent_dir(host) / "daemon.log"

    def log(self, host: str) -> str:
        return self.log_path(host).read_text(errors="replace")

    def start(self, host: str = HOST) -> subprocess.Popen[str]:
        mark = len(self.log(host)) if self.log_path(host).exists() else 0
        config = str(self.dep.agent_dir(host) / "client.ini")
        with open(self.log_path(host), "a", encoding="utf-8") as log:
            proc = subprocess.Popen(
                self.dep.agent_args(host, "-c", config, "-v", "daemon"),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.procs[host] = proc
        wait_for(lambda: "daemon started" in self.log(host)[mark:], 30, f"{host} to start")
        return proc

    def polls(self, host: str, why: str = "") -> int:
        return sum(
            1
            for line in self.log(host).splitlines()
            if " poll " in line and "new job(s)" in line and why in line
        )

    def poll_now(self, host: str, cert: Path | None, key: Path | None = None) -> Any:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # agents have no host name to check (PROTOCOL.md)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(self.dep.state_dir / "ca.pem"))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key or cert))
        proxy = xmlrpc.client.ServerProxy(
            f"https://127.0.0.1:{self.ports[host]}/", transport=tls.TLSTransport(context, 10)
        )
        try:
            return proxy.poll_now()
        finally:
            proxy("close")()

    def as_server(self, host: str = HOST) -> Any:
        state = self.dep.state_dir
        return self.poll_now(host, state / "server.pem", state / "server.key")

    def submit(self, *args: str) -> int:
        return self.dep.submit("--host", HOST, *args)

    def assignment(self, job_id: int) -> dict[str, Any]:
        (row,) = self.dep.job(job_id)["assignments"]
        return dict(row)

    def wait_final(self, job_id: int, timeout: float = 30) -> dict[str, Any]:
        final = {"succeeded", "failed", "timed_out", "cancelled", "expired", "denied"}
        return dict(
            wait_for(
                lambda: (a := self.assignment(job_id))["state"] in final and a,
                timeout,
                f"job {job_id} to end",
            )
        )

    def go(self, host: str = HOST) -> None:
        (self.dep.agent_dir(host) / "go").touch()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


@pytest.fixture
def rig(deployment: Deployment) -> Iterator[DaemonRig]:
    rig = DaemonRig(deployment)
    yield rig
    rig.close()


def test_poll_now_from_the_server_runs_a_job_at_once_and_no_one_else_may_call_it(
    rig: DaemonRig,
) -> None:
    rig.enroll(HOST)
    rig.enroll("d2")
    rig.start()
    wait_for(lambda: rig.polls(HOST) >= 1, 30, "the first poll")
    job = rig.submit("--command", "echo hello from the daemon")
    assert rig.as_server() is True
    row = rig.wait_final(job)
    assert (row["state"], row["exit_code"], row["output"]) == (
        "succeeded",
        0,
        "hello from the daemon\n",
    )
    assert rig.polls(HOST, "(poll_now)") >= 1
    # An agent's certificate, a user's, none: refused.
    other = rig.dep.agent_dir("d2")
    for cert, key in ((other / "cert.pem", other / "key.pem"), (rig.dep.bundle, None)):
        with pytest.raises(xmlrpc.client.Fault) as refused:
            rig.poll_now(HOST, cert, key)
        assert refused.value.faultCode == 2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        rig.poll_now(HOST, None)
    assert "refused poll_now" in rig.log(HOST)
    # Presence went with the polls: the server knows the daemon and where to wake it.
    (client,) = [c for c in rig.dep.admin("client", "list") if c["name"] == HOST]
    assert client["agent_mode"] == "daemon"
    assert client["callback_address"] == f"127.0.0.1:{rig.ports[HOST]}"
    rig.procs[HOST].send_signal(signal.SIGTERM)
    assert rig.procs[HOST].wait(30) == 0


def test_a_burst_of_hints_makes_few_polls(rig: DaemonRig) -> None:
    rig.enroll(HOST)
    rig.start()
    wait_for(lambda: rig.polls(HOST) >= 1, 30, "the first poll")
    before = rig.polls(HOST)
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: rig.as_server(), range(50)))
    assert answers == [True] * 50
    wait_for(lambda: rig.polls(HOST, "(poll_now)") >= 1, 10, "a hinted poll")
    time.sleep(1.5)  # room for any poll the burst still owes (HINT_GAP is 0.1 s)
    hinted = rig.polls(HOST) - before
    print(f"\n50 poll_now hints -> {hinted} poll(s)")
    assert 1 <= hinted <= 10
    rig.procs[HOST].send_signal(signal.SIGTERM)
    assert rig.procs[HOST].wait(30) == 0


def test_sigterm_lets_a_running_job_finish_and_a_short_grace_kills_it(rig: DaemonRig) -> None:
    rig.enroll(HOST, shutdown_grace=60)
    job = rig.submit("--command", WAIT_FOR_GO)
    proc = rig.start()
    wait_for(lambda: rig.assignment(job)["state"] == "running", 30, "the job to run")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: 1 running job(s)" in rig.log(HOST), 10, "the daemon to stop")
    rig.go()
    assert proc.wait(30) == 0
    row = rig.assignment(job)
    assert (row["state"], row["output"]) == ("succeeded", "started\ndone\n")
    # Again with one second of grace, for a job that never ends by itself.
    (rig.dep.agent_dir(HOST) / "go").unlink()
    config = rig.dep.agent_dir(HOST) / "client.ini"
    config.write_text(config.read_text().replace("shutdown_grace = 60", "shutdown_grace = 1"))
    job = rig.submit("--command", WAIT_FOR_GO)
    proc = rig.start()
    wait_for(lambda: rig.assignment(job)["state"] == "running", 30, "the job to run")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    row = rig.assignment(job)
    assert row["state"] == "failed"
    assert "shutdown_grace of 1 s ran out" in row["reason"]
    assert row["output"] == "started\n"


def test_kill_9_while_a_job_runs_then_the_real_result_is_reported(rig: DaemonRig) -> None:
    rig.enroll(HOST)
    script = f"{WAIT_FOR_GO}; exit 3"
    # Killed while the job runs, restarted while it still runs: re-attached.
    job = rig.submit("--command", script)
    proc = rig.start()
    wait_for(lambda: rig.assignment(job)["state"] == "running", 30, "the job to run")
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    proc = rig.start()
    wait_for(lambda: "re-attached to it" in rig.log(HOST), 10, "the re-attachment")
    rig.go()
    row = rig.wait_final(job)
    assert (row["state"], row["exit_code"], row["output"]) == ("failed", 3, "started\ndone\n")
    assert row["reason"] in (None, "")
    # Killed while the job runs, the job ends while no agent runs: its record tells.
    (rig.dep.agent_dir(HOST) / "go").unlink()
    job = rig.submit("--command", script)
    assert rig.as_server() is True
    wait_for(lambda: rig.assignment(job)["state"] == "running", 30, "the job to run")
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    rig.go()
    record = rig.dep.agent_dir(HOST) / "spool" / str(job) / "exit_status"
    wait_for(record.exists, 10, "the exit record")
    assert json.loads(record.read_text())["exit_status"] == 3
    assert rig.assignment(job)["state"] == "running"  # nobody told the server yet
    proc = rig.start()
    row = rig.wait_final(job)
    assert (row["state"], row["exit_code"], row["output"]) == ("failed", 3, "started\ndone\n")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_max_parallel_runs_two_at_once_in_priority_order(rig: DaemonRig) -> None:
    rig.enroll(HOST, max_parallel=2)
    order = "../../../order.log"
    jobs = {}
    for name, priority in (("low", 0), ("middle", 5), ("high", 9)):
        script = f'echo "$SCIRE_JOB_NAME" >> {order}; {WAIT_FOR_GO}'
        jobs[name] = rig.submit("--command", script, "--name", name, "--priority", str(priority))
    proc = rig.start()
    started = rig.dep.agent_dir(HOST) / "order.log"
    wait_for(lambda: started.exists() and len(started.read_text().split()) == 2, 30, "two jobs")
    assert started.read_text().split() == ["high", "middle"]
    assert rig.assignment(jobs["low"])["state"] != "running"
    assert {rig.assignment(jobs[n])["state"] for n in ("high", "middle")} == {"running"}
    rig.go()
    for job in jobs.values():
        assert rig.wait_final(job)["state"] == "succeeded"
    assert started.read_text().split() == ["high", "middle", "low"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


# --- push: the server wakes its daemons -------------------------------------------------


def _known_as_daemon(rig: DaemonRig, host: str = HOST) -> bool:
    return any(
        c["name"] == host and c["agent_mode"] == "daemon" and c["callback_address"]
        for c in rig.dep.admin("client", "list")
    )


def _admin_proxy(dep: Deployment) -> Any:
    context = tls.client_context(dep.state_dir / "ca.pem", dep.bundle, dep.bundle)
    return xmlrpc.client.ServerProxy(
        dep.url, transport=tls.TLSTransport(context, 30), allow_none=True
    )


def test_a_submission_wakes_the_daemon_through_the_push(rig: DaemonRig) -> None:
    rig.enroll(HOST)
    rig.start()
    wait_for(lambda: _known_as_daemon(rig), 30, "the server to learn the callback")
    polls = rig.polls(HOST)
    # The poll interval is 300 s: only the server's poll_now can start this job in time.
    job = rig.submit("--command", "echo pushed")
    row = rig.wait_final(job)
    assert (row["state"], row["output"]) == ("succeeded", "pushed\n")
    assert rig.polls(HOST, "(poll_now)") >= 1 and rig.polls(HOST) > polls
    # The push is counted where an operator looks: the server's /metrics.
    context = tls.client_context(rig.dep.state_dir / "ca.pem", rig.dep.bundle, rig.dep.bundle)
    scrape = http.client.HTTPSConnection("127.0.0.1", rig.dep.port, context=context, timeout=30)
    scrape.request("GET", "/metrics")
    body = scrape.getresponse().read().decode()
    scrape.close()
    (succeeded,) = [
        line for line in body.splitlines() if line.startswith("scire_push_succeeded_total ")
    ]
    assert float(succeeded.split()[1]) >= 1
    rig.procs[HOST].send_signal(signal.SIGTERM)
    assert rig.procs[HOST].wait(30) == 0


def test_a_burst_of_50_submissions_makes_few_polls(rig: DaemonRig) -> None:
    rig.enroll(HOST)
    rig.start()
    wait_for(lambda: _known_as_daemon(rig), 30, "the server to learn the callback")
    before = rig.polls(HOST)
    spec = {"script": "true", "hosts": [HOST]}

    def submit(_: int) -> int:
        proxy = _admin_proxy(rig.dep)
        try:
            return int(proxy.admin.job_submit(spec)["job_id"])
        finally:
            proxy("close")()

    with ThreadPoolExecutor(10) as pool:
        jobs = list(pool.map(submit, range(50)))
    for job in jobs:
        assert rig.wait_final(job, timeout=120)["state"] == "succeeded"
    polls = rig.polls(HOST) - before
    print(f"\n50 submissions -> {polls} poll(s)")
    # Each poll takes up to 10 jobs; a poll per submission would be 50.
    assert polls < 25
    rig.procs[HOST].send_signal(signal.SIGTERM)
    assert rig.procs[HOST].wait(30) == 0


def test_a_push_to_a_dead_daemon_costs_the_submission_nothing(rig: DaemonRig) -> None:
    rig.enroll(HOST)
    proc = rig.start()
    wait_for(lambda: _known_as_daemon(rig), 30, "the server to learn the callback")
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    job = rig.submit("--command", "echo later")  # exits 0 whatever the push does
    wait_for(
        lambda: f"to client {HOST} at 127.0.0.1:{rig.ports[HOST]} failed" in rig.dep.server_log(),
        30,
        "the failed push in the server's log",
    )
    assert rig.assignment(job)["state"] == "pending"
    # The job waits for the agent's next poll: here, its start.
    rig.start()
    row = rig.wait_final(job)
    assert (row["state"], row["output"]) == ("succeeded", "later\n")
    rig.procs[HOST].send_signal(signal.SIGTERM)
    assert rig.procs[HOST].wait(30) == 0
