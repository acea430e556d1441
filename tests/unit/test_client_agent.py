"""The agent end to end (enrollment, normal mode, failover, the CLI) against a small
in-process XML-RPC server over real TLS that speaks the wire contract."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xmlrpc.server import SimpleXMLRPCServer

import pytest

from scire_client import __version__, cli, enroll
from scire_client.config import ClientConfig
from scire_client.exceptions import ConfigError, EnrollmentPending
from scire_client.spool import Spool
from scire_schema import certs, documents, protocol, tls
from scire_schema.documents import JobDocument, StatusReport
from scire_server import ca


class FakeServer:
    """The agent API of the contract, with knobs for the tests."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca_key, self.ca_cert = ca.create_ca()
        key = certs.generate_key()
        cert = ca.issue_certificate(
            self.ca_key, self.ca_cert, key.public_key(), "server", ca.ROLE_SERVER, ["127.0.0.1"]
        )
        (tmp_path / "server").mkdir()
        files = {name: tmp_path / "server" / f"{name}.pem" for name in ("ca", "cert", "key")}
        files["ca"].write_bytes(certs.cert_to_pem(self.ca_cert))
        files["cert"].write_bytes(certs.cert_to_pem(cert))
        files["key"].write_bytes(certs.key_to_pem(key))
        context = tls.server_context(files["cert"], files["key"], files["ca"])
        self.enroll_status = "accepted"
        self.jobs: list[str] = []
        self.reconcile: list[dict[str, Any]] = []
        self.cancel_running: set[int] = set()
        self.report_fault: int | None = None
        self.report_fault_text = "not now"
        self.reports: list[StatusReport] = []
        self.acks: list[dict[str, Any]] = []
        self.polls: list[tuple[list[int], list[int], int]] = []
        self.presences: list[Any] = []
        # Refuses agent.poll's presence, as servers before issue 8 do, and has no
        # agent.report_many nor acknowledgements that start a job (before issue 10).
        self.old_server = False
        self.report_calls: list[int] = []  # reports per report or report_many call
        self.registrations: list[tuple[str, str, dict[str, str], str]] = []
        self._rpc = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)
        self._rpc.socket = context.wrap_socket(self._rpc.socket, server_side=True)
        methods = (
            "ca_certificate",
            "register",
            "fetch_certificate",
            "poll",
            "acknowledge",
            "report",
            "report_many",
        )
        for method in methods:
            self._rpc.register_function(getattr(self, method), f"agent.{method}")
        self.url = f"https://127.0.0.1:{self._rpc.server_address[1]}/"
        self._thread = threading.Thread(target=self._rpc.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._rpc.shutdown()
        self._rpc.server_close()

    @property
    def ca_fingerprint(self) -> str:
        return certs.fingerprint(self.ca_cert)

    def ca_certificate(self) -> str:
        return certs.cert_to_pem(self.ca_cert).decode()

    def register(self, name: str, csr: str, facts: dict[str, str], token: str) -> dict[str, str]:
        self.registrations.append((name, csr, facts, token))
        return {"name": name, "status": "accepted" if token == "good" else self.enroll_status}

    def fetch_certificate(self, name: str, csr: str) -> dict[str, str]:
        token = self.registrations[-1][3] if self.registrations else ""
        status = "accepted" if token == "good" else self.enroll_status
        if status != "accepted":
            return {"status": status, "certificate": ""}
        cert = ca.sign_csr(self.ca_key, self.ca_cert, csr, name, ca.ROLE_CLIENT)
        return {"status": "accepted", "certificate": certs.cert_to_pem(cert).decode()}

    def poll(
        self, held: list[int], running: list[int], limit: int, presence: Any = None
    ) -> dict[str, Any]:
        if presence is not None and self.old_server:
            raise xmlrpc.client.Fault(4, "wrong arguments for agent.poll: it takes (held, ...)")
        self.polls.append((held, running, limit))
        self.presences.append(presence)
        jobs, self.jobs = self.jobs[:limit], self.jobs[limit:]
        reconcile, self.reconcile = self.reconcile, []
        reconcile += [
            {"job_id": i, "action": "cancelled"} for i in running if i in self.cancel_running
        ]
        return {"jobs": jobs, "reconcile": reconcile, "poll_interval": 60}

    def acknowledge(self, deliveries: list[dict[str, Any]]) -> dict[str, list[int]]:
        self.acks.extend(deliveries)
        acknowledged = [d["job_id"] for d in deliveries]
        if self.old_server:
            return {"acknowledged": acknowledged}
        started = []
        for d in deliveries:
            if d.get("started"):
                # The acknowledgement says the job runs: recorded as its running report.
                when = protocol.parse_time(d["started"])
                self.reports.append(
                    StatusReport(d["job_id"], d["delivery_id"], "running", started=when)
                )
                started.append(d["job_id"])
        return {"acknowledged": acknowledged, "started": started}

    def report(self, status_xml: str) -> dict[str, Any]:
        if self.report_fault is not None:
            raise xmlrpc.client.Fault(self.report_fault, self.report_fault_text)
        self.report_calls.append(1)
        return self._apply(status_xml)

    def _apply(self, status_xml: str) -> dict[str, Any]:
        report = documents.parse_status(status_xml)
        self.reports.append(report)
        return {"job_id": report.job_id, "state": report.state, "result": "applied"}

    def report_many(self, status_xmls: list[str]) -> dict[str, Any]:
        if self.old_server:
            raise xmlrpc.client.Fault(2, "no method agent.report_many")
        fault = self.report_fault
        if fault is not None and fault not in protocol.PERMANENT_FAULTS:
            raise xmlrpc.client.Fault(fault, self.report_fault_text)  # the whole call
        self.report_calls.append(len(status_xmls))
        if fault is not None:  # a refusal of each report alone, as the server's NotHeld
            return {
                "results": [{"fault": fault, "message": self.report_fault_text}] * len(status_xmls)
            }
        return {"results": [self._apply(text) for text in status_xmls]}

    def final_reports(self) -> list[tuple[int, str]]:
        return [(r.job_id, r.state) for r in self.reports if r.state != "running"]


def make_job(job_id: int, script: str, **changes: object) -> JobDocument:
    values: dict[str, object] = {
        "job_id": job_id,
        "delivery_id": uuid.uuid4().hex,
        "attempt": 1,
        "name": f"job-{job_id}",
        "owner": "alice",
        "client": "web-17",
        "privilege": "run",
        "priority": 0,
        "timeout": 30,
        "output_limit": 4096,
        "interpreter": "/bin/sh",
        "created": dt.datetime(2024, 1, 1),
        "script": script,
    }
    values.update(changes)
    return JobDocument(**values)  # type: ignore[arg-type]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeServer]:
    fake = FakeServer(tmp_path)
    yield fake
    fake.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"https://127.0.0.1:{port}/"


def write_config(tmp_path: Path, server: FakeServer, **values: object) -> Path:
    settings: dict[str, object] = {
        "name": "web-17",
        "servers": server.url,
        "state_dir": tmp_path / "state",
        "ca_fingerprint": server.ca_fingerprint,
        "enrollment_token": "good",
        "report_retry_for": 1,
        "kill_grace": 1,
        **values,
    }
    path = tmp_path / "client.ini"
    lines = ["[client]", *(f"{key} = {value}" for key, value in settings.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(config: Path, *args: str) -> int:
    return cli.main(["-c", str(config), *args])


def test_enrollment_fetches_and_checks_the_ca(tmp_path: Path, server: FakeServer) -> None:
    config = ClientConfig.load(write_config(tmp_path, server))
    assert enroll.ensure_enrolled(config) is True
    assert config.ca_path.read_bytes() == certs.cert_to_pem(server.ca_cert)
    assert stat.S_IMODE(config.key_file.stat().st_mode) == 0o600
    cert = certs.load_cert(config.cert_file.read_bytes())
    cert.verify_directly_issued_by(server.ca_cert)
    assert certs.common_name(cert) == "web-17"
    [(name, _csr, facts, token)] = server.registrations
    assert (name, token) == ("web-17", "good")
    assert set(facts) == {"hostname", "os", "python", "machine"}
    assert enroll.ensure_enrolled(config) is False


def test_a_ca_with_another_fingerprint_is_refused(tmp_path: Path, server: FakeServer) -> None:
    config = ClientConfig.load(write_config(tmp_path, server, ca_fingerprint="ab" * 32))
    with pytest.raises(ConfigError, match="refusing it"):
        enroll.ensure_enrolled(config)
    assert not config.ca_path.exists()


def test_no_ca_file_and_no_fingerprint(tmp_path: Path, server: FakeServer) -> None:
    config = ClientConfig.load(write_config(tmp_path, server, ca_fingerprint=""))
    with pytest.raises(ConfigError, match="no CA file and no ca_fingerprint"):
        enroll.ensure_enrolled(config)


def test_pending_then_accepted_reuses_the_request(tmp_path: Path, server: FakeServer) -> None:
    server.enroll_status = "pending"
    config = write_config(tmp_path, server, enrollment_token="")
    assert run_cli(config, "enroll") == cli.EXIT_PENDING
    with pytest.raises(EnrollmentPending, match="scire-admin client accept web-17"):
        enroll.ensure_enrolled(ClientConfig.load(config, enroll_wait=0.1))
    server.enroll_status = "accepted"
    assert run_cli(config, "enroll") == cli.EXIT_OK
    assert len({csr for _, csr, _, _ in server.registrations}) == 1
    assert (tmp_path / "state" / "cert.pem").exists()


def test_a_rejected_request(tmp_path: Path, server: FakeServer) -> None:
    server.enroll_status = "rejected"
    assert (
        run_cli(write_config(tmp_path, server, enrollment_token=""), "enroll") == cli.EXIT_REFUSED
    )


def test_run_executes_by_priority_reports_and_never_reruns(
    tmp_path: Path, server: FakeServer
) -> None:
    trace = tmp_path / "trace"
    low = make_job(1, f"echo low >> {trace}\n", priority=1)
    high = make_job(2, f"echo high >> {trace}\nexit 4\n", priority=9)
    server.jobs = [documents.render_job(low), documents.render_job(high)]
    config = write_config(tmp_path, server)
    assert run_cli(config) == cli.EXIT_OK
    assert trace.read_text() == "high\nlow\n"
    assert [(r.job_id, r.state) for r in server.reports] == [
        (2, "running"),
        (2, "failed"),
        (1, "running"),
        (1, "succeeded"),
    ]
    assert server.reports[1].exit_code == 4
    assert {a["job_id"] for a in server.acks} == {1, 2}
    # At least once on the wire: the same delivery again is acknowledged, not run.
    server.jobs = [documents.render_job(low)]
    server.reports.clear()
    assert run_cli(config) == cli.EXIT_OK
    assert trace.read_text() == "high\nlow\n"
    assert server.reports == []
    assert server.acks[-1] == {"job_id": 1, "delivery_id": low.delivery_id}


def test_reconcile_cancels_a_held_job(tmp_path: Path, server: FakeServer) -> None:
    trace = tmp_path / "trace"
    job = make_job(5, f"echo ran > {trace}\n")
    server.jobs = [documents.render_job(job)]
    server.reconcile = [{"job_id": 5, "action": "cancelled"}]
    assert run_cli(write_config(tmp_path, server)) == cli.EXIT_OK
    assert not trace.exists()
    [report] = server.reports
    assert (report.state, report.reason) == ("cancelled", "cancelled by the server")


def test_a_heartbeat_cancels_a_running_job(tmp_path: Path, server: FakeServer) -> None:
    server.jobs = [documents.render_job(make_job(6, "sleep 30\n"))]
    server.cancel_running = {6}
    assert run_cli(write_config(tmp_path, server, heartbeat_interval=0.2)) == cli.EXIT_OK
    assert server.final_reports() == [(6, "cancelled")]
    assert ([], [6], 0) in server.polls


def test_failover_to_the_second_server(tmp_path: Path, server: FakeServer) -> None:
    server.jobs = [documents.render_job(make_job(7, "echo hi\n"))]
    config = write_config(tmp_path, server, servers=f"{closed_port_url()}, {server.url}")
    assert run_cli(config) == cli.EXIT_OK
    assert server.final_reports() == [(7, "succeeded")]


def test_undelivered_reports_wait_on_disk(tmp_path: Path, server: FakeServer) -> None:
    trace = tmp_path / "trace"
    server.jobs = [documents.render_job(make_job(8, f"echo ran >> {trace}\n"))]
    server.report_fault = 10  # unavailable: retry
    config = write_config(tmp_path, server, report_retry_for=0.6)
    assert run_cli(config) == cli.EXIT_ERROR
    spool = Spool(tmp_path / "state" / "spool")
    assert [job_id for job_id, _ in spool.pending_reports()] == [8]
    server.report_fault = None
    assert run_cli(config) == cli.EXIT_OK
    assert server.final_reports() == [(8, "succeeded")]
    assert trace.read_text() == "ran\n"


def test_a_run_told_to_pause_long_exits_0_and_keeps_its_report(
    tmp_path: Path, server: FakeServer
) -> None:
    server.jobs = [documents.render_job(make_job(8, "echo ran\n"))]
    server.report_fault = 10  # unavailable, and it says for how long: a pause, not an error
    server.report_fault_text = "database unavailable: x; " + protocol.retry_after_text(600)
    config = write_config(tmp_path, server, report_retry_for=5)
    assert run_cli(config) == cli.EXIT_OK
    spool = Spool(tmp_path / "state" / "spool")
    assert [job_id for job_id, _ in spool.pending_reports()] == [8]
    server.report_fault = None
    assert run_cli(config) == cli.EXIT_OK
    assert server.final_reports() == [(8, "succeeded")]


def test_a_permanent_fault_drops_the_report(tmp_path: Path, server: FakeServer) -> None:
    server.jobs = [documents.render_job(make_job(9, "true\n"))]
    server.report_fault = 6  # not held
    assert run_cli(write_config(tmp_path, server)) == cli.EXIT_OK
    assert Spool(tmp_path / "state" / "spool").pending_reports() == []


def test_no_server_reachable(tmp_path: Path, server: FakeServer) -> None:
    config = write_config(tmp_path, server)
    assert run_cli(config, "enroll") == cli.EXIT_OK
    config = write_config(tmp_path, server, servers=closed_port_url(), connect_timeout=1)
    assert run_cli(config) == cli.EXIT_ERROR


def test_an_untrusted_server_is_refused(tmp_path: Path, server: FakeServer) -> None:
    config = write_config(tmp_path, server)
    assert run_cli(config, "enroll") == cli.EXIT_OK
    other_key, other_ca = ca.create_ca("Other CA")
    (tmp_path / "state" / "ca.pem").write_bytes(certs.cert_to_pem(other_ca))
    config = write_config(tmp_path, server, ca_fingerprint="")
    assert run_cli(config) == cli.EXIT_ERROR


def test_spool_command_and_usage_errors(
    tmp_path: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.jobs = [documents.render_job(make_job(10, "true\n"))]
    config = write_config(tmp_path, server)
    assert run_cli(config) == cli.EXIT_OK
    capsys.readouterr()
    assert cli.main(["--state-dir", str(tmp_path / "state"), "spool"]) == cli.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["JOB", "STATE", "CANCELLED", "NAME"]
    assert out[1].split() == ["10", "reported", "job-10"]
    assert cli.main(["spool"]) == cli.EXIT_USAGE  # no state_dir
    assert cli.main(["--state-dir", str(tmp_path), "--server", "http://x/", "run"]) == 2
    assert run_cli(write_config(tmp_path, server, poll_batch=0)) == cli.EXIT_USAGE
    assert cli.main(["bogus"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "scire-client: error: poll_batch must be at least 1" in err


def test_tls_errors_are_transport_errors() -> None:
    # ssl errors are OSErrors: the mapping in transport.py relies on it.
    assert issubclass(ssl.SSLError, OSError)


def _kill_agent_mid_job(tmp_path: Path, server: FakeServer) -> tuple[Path, Path, int]:
    """Start ``scire-client run`` on a job that waits for a ``go`` file, SIGKILL the
    agent once the job runs; the config, the go file and the job's process group."""
    trace, go = tmp_path / "trace", tmp_path / "go"
    script = f"echo started\ntouch {trace}\nwhile [ ! -e {go} ]; do sleep 0.05; done\necho done\nexit 3\n"
    server.jobs = [documents.render_job(make_job(11, script, timeout=300))]
    config = write_config(tmp_path, server)
    agent = subprocess.Popen(
        [sys.executable, "-m", "scire_client.cli", "-c", str(config)], stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while not trace.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.kill()
    agent.wait()
    [entry] = Spool(tmp_path / "state" / "spool").entries()
    assert entry.state == "started" and entry.pgid is not None
    os.killpg(entry.pgid, 0)  # the job outlived its agent, in its own session
    return config, go, entry.pgid


def test_a_job_that_finished_while_its_agent_was_dead_reports_its_real_result(
    tmp_path: Path, server: FakeServer
) -> None:
    config, go, pgid = _kill_agent_mid_job(tmp_path, server)
    go.touch()
    record = tmp_path / "state" / "spool" / "11" / "exit_status"
    deadline = time.monotonic() + 10
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_cli(config) == cli.EXIT_OK
    [report] = [r for r in server.reports if r.state != "running"]
    assert (report.job_id, report.state, report.exit_code, report.reason) == (11, "failed", 3, None)
    assert report.output == "started\ndone\n"
    assert not any(_alive(pid) for pid in _group_members(pgid))


def test_a_restarted_agent_re_attaches_to_a_job_still_running(
    tmp_path: Path, server: FakeServer
) -> None:
    config, go, pgid = _kill_agent_mid_job(tmp_path, server)
    polls = len(server.polls)
    result: list[int] = []
    restarted = threading.Thread(target=lambda: result.append(run_cli(config)))
    restarted.start()
    # A re-attached run begins with a heartbeat poll; the job still waits for its go.
    deadline = time.monotonic() + 10
    while len(server.polls) == polls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.polls) > polls and _alive(pgid)
    go.touch()
    restarted.join(60)
    assert result == [cli.EXIT_OK]
    [report] = [r for r in server.reports if r.state != "running"]
    assert (report.job_id, report.state, report.exit_code) == (11, "failed", 3)
    assert report.output == "started\ndone\n"


def test_a_job_whose_wrapper_died_too_is_reported_agent_restarted(
    tmp_path: Path, server: FakeServer
) -> None:
    config, _go, pgid = _kill_agent_mid_job(tmp_path, server)
    [entry] = Spool(tmp_path / "state" / "spool").entries()
    assert entry.wrapper_pid is not None
    os.kill(entry.wrapper_pid, signal.SIGKILL)  # neither the agent nor the wrapper can tell
    deadline = time.monotonic() + 10
    while _alive(entry.wrapper_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_cli(config) == cli.EXIT_OK
    [report] = [r for r in server.reports if r.state != "running"]
    assert (report.job_id, report.state, report.reason) == (11, "failed", "agent restarted")
    assert report.output == "started\n"
    assert not any(_alive(pid) for pid in _group_members(pgid))


def test_presence_goes_with_each_poll_and_an_older_server_gets_none(
    tmp_path: Path, server: FakeServer
) -> None:
    config = write_config(tmp_path, server)
    assert run_cli(config) == cli.EXIT_OK
    assert server.presences and all(
        p == {"version": __version__, "mode": "once", "callback": ""} for p in server.presences
    )
    server.old_server = True
    server.presences.clear()
    server.jobs = [documents.render_job(make_job(12, "echo hi\n"))]
    assert run_cli(config) == cli.EXIT_OK
    assert server.final_reports() == [(12, "succeeded")]
    assert server.presences and all(p is None for p in server.presences)
    # Without agent.report_many and started acknowledgements: one report per call.
    assert [(r.job_id, r.state) for r in server.reports[-2:]] == [
        (12, "running"),
        (12, "succeeded"),
    ]
    assert server.report_calls[-2:] == [1, 1]


def test_the_job_started_at_once_is_acknowledged_as_running_and_reports_go_together(
    tmp_path: Path, server: FakeServer
) -> None:
    jobs = [make_job(n, f"exit {n % 2}\n") for n in (21, 22, 23)]
    server.jobs = [documents.render_job(job) for job in jobs]
    assert run_cli(write_config(tmp_path, server)) == cli.EXIT_OK
    # The first job starts right after the poll: its acknowledgement says so.
    assert [("started" in ack) for ack in server.acks] == [True, False, False]
    assert server.final_reports() == [(21, "failed"), (22, "succeeded"), (23, "failed")]
    assert [(r.job_id, r.state) for r in server.reports if r.state == "running"] == [
        (21, "running"),
        (22, "running"),
        (23, "running"),
    ]
    # Reports that wait in the spool together go in one call.
    server.jobs = [documents.render_job(make_job(n, "true\n")) for n in (24, 25)]
    server.report_fault = 10  # a pause: the run goes on and its reports wait
    server.report_fault_text = protocol.retry_after_text(600)
    config = write_config(tmp_path, server)
    assert run_cli(config) == cli.EXIT_OK
    assert len(Spool(tmp_path / "state" / "spool").pending_reports()) == 2
    server.report_fault = None
    server.report_calls.clear()
    assert run_cli(config) == cli.EXIT_OK
    assert server.report_calls == [2]
    assert server.final_reports()[-2:] == [(24, "succeeded"), (25, "succeeded")]


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat_file.parent.name))
    return members


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie waits for init to reap it; it runs nothing


def test_spool_json_lists_the_entries(
    tmp_path: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(tmp_path / "state")
    assert cli.main(["--state-dir", state, "spool", "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out) == []
    server.jobs = [documents.render_job(make_job(11, "true\n"))]
    assert run_cli(write_config(tmp_path, server)) == cli.EXIT_OK
    capsys.readouterr()
    assert cli.main(["--state-dir", state, "spool", "--json"]) == cli.EXIT_OK
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["job_id"], entry["name"], entry["state"]) == (11, "job-11", "reported")
    assert entry["cancelled"] is None
    assert entry["started_at"] is not None


def test_run_exits_non_zero_when_a_job_cannot_be_spooled(
    tmp_path: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, server)
    assert run_cli(config, "enroll") == cli.EXIT_OK
    # A file where the job's spool directory must go fails like a full disk does.
    spool_dir = ClientConfig.load(config).spool_dir
    spool_dir.mkdir(parents=True, exist_ok=True)
    (spool_dir / "12").write_text("in the way")
    server.jobs = [documents.render_job(make_job(12, "true\n"))]
    assert run_cli(config) == cli.EXIT_ERROR
    assert server.acks == []
    assert "spool or disk failure" in capsys.readouterr().err
    (spool_dir / "12").unlink()
    server.jobs = [documents.render_job(make_job(12, "true\n"))]  # the lease ran out
    assert run_cli(config) == cli.EXIT_OK
    assert [r.state for r in server.reports] == ["running", "succeeded"]
