"""What the hostile-input tests share: a peer that speaks HTTP over TLS by hand,
an agent that keeps completing jobs, the server process's memory, and a
snapshot of the database that proves an attack changed nothing.

Peers connect from other loopback addresses (127.0.0.2 and up) than the agent
and ``scire-admin`` (127.0.0.1), as a stranger on the network would: the
listener's per-address cap is meant to stop one address, not to lock out
the agents sharing it.
"""

from __future__ import annotations

import http.client
import re
import sqlite3
import ssl
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import Deployment

from scire_schema import tls
from scire_schema.protocol import FaultCode

#: Python's own words in a message: an exception leaked to the peer.
LEAK_MARKERS = ("<class", "Traceback", "Error:")
#: The audit actions of refused calls: refusals are recorded by design, so a
#: "nothing changed" comparison leaves them out.
REFUSAL_ACTIONS = ("refused", "anonymous_refusals")
WAIT = 30.0  # seconds any one socket operation of a test peer may take


def attacker_address(index: int) -> str:
    """A loopback source address that is not the agents' 127.0.0.1."""
    return f"127.0.0.{2 + index % 200}"


def anonymous_context(dep: Deployment) -> ssl.SSLContext:
    """A caller without a certificate that trusts the deployment's CA."""
    return tls.client_context(dep.state_dir / "ca.pem")


def certificate_context(dep: Deployment, cert: Path, key: Path) -> ssl.SSLContext:
    return tls.client_context(dep.state_dir / "ca.pem", cert, key)


@dataclass
class Answer:
    """One HTTP answer and, when it is XML-RPC, what it says."""

    status: int
    body: bytes
    fault_code: int | None = None
    fault_string: str = ""
    value: Any = None

    @property
    def is_fault(self) -> bool:
        return self.fault_code is not None


def decode(status: int, body: bytes) -> Answer:
    """An HTTP answer; an XML-RPC body is parsed (the server's answers are trusted XML)."""
    answer = Answer(status, body)
    if status == 200:
        try:
            (answer.value,), _ = xmlrpc.client.loads(body)
        except xmlrpc.client.Fault as fault:
            answer.fault_code, answer.fault_string = fault.faultCode, fault.faultString
    return answer


class Peer:
    """One keep-alive HTTPS connection from ``source``, posting bodies by hand."""

    def __init__(self, dep: Deployment, context: ssl.SSLContext, source: str = "127.0.0.2") -> None:
        self.connection = http.client.HTTPSConnection(
            "127.0.0.1", dep.port, context=context, timeout=WAIT, source_address=(source, 0)
        )

    def post(self, body: bytes, path: str = "/RPC2") -> Answer:
        self.connection.request("POST", path, body, {"Content-Type": "text/xml"})
        response = self.connection.getresponse()
        data = response.read()
        if response.will_close:
            self.connection.close()
        return decode(response.status, data)

    def close(self) -> None:
        self.connection.close()


def leaked_exception_text(message: str, sent: bytes = b"") -> list[str]:
    """The markers of Python exception text in ``message`` that the caller did
    not send itself (a short echo of the caller's own value is allowed)."""
    return [m for m in LEAK_MARKERS if m in message and m.encode() not in sent]


def assert_stable_fault(answer: Answer, sent: bytes = b"") -> None:
    """A fault whose code is one of the protocol's, never the internal error,
    and whose message carries no Python exception text."""
    assert answer.status == 200, answer
    assert answer.fault_code is not None, answer
    assert answer.fault_code in {c.value for c in FaultCode}, answer
    assert answer.fault_code != FaultCode.INTERNAL, answer
    assert not leaked_exception_text(answer.fault_string, sent), answer.fault_string


# --- the server process ----------------------------------------------------------


def process_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict (empty when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def server_alive(pid: int) -> bool:
    """Running, not exited (a zombie is the test's unreaped child that died)."""
    state = process_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (``VmHWM``) in MiB."""
    return int(process_status(pid)["VmHWM"].split()[0]) / 1024


def rss_mib(pid: int) -> float:
    return int(process_status(pid)["VmRSS"].split()[0]) / 1024


def reset_peak_rss(pid: int) -> None:
    """Start ``VmHWM`` again from the current RSS (Linux ``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def log_problems(log: str) -> list[str]:
    """Lines of the server log that must never appear: tracebacks and recursion."""
    return [
        line
        for line in log.splitlines()
        if "Traceback" in line or "RecursionError" in line or "internal error" in line
    ]


# --- the database -------------------------------------------------------------------

#: Columns that change on every call or tick by design.
VOLATILE_COLUMNS = {"clients": {"last_seen_at"}}
SKIPPED_TABLES = {"servers", "alembic_version"}
TableRows = dict[str, list[tuple[Any, ...]]]


def database_snapshot(
    dep: Deployment, without_jobs: set[int] | frozenset[int] = frozenset()
) -> TableRows:
    """Every row of every table of the deployment's SQLite file, except the daemon
    heartbeat, ``last_seen_at``, the audit rows of refused calls and the rows of
    the jobs in ``without_jobs`` (a job the test itself submitted)."""
    connection = sqlite3.connect(f"file:{dep.state_dir / 'scire.db'}?mode=ro", uri=True)
    try:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
            if name not in SKIPPED_TABLES and not name.startswith("sqlite_")
        ]
        snapshot: TableRows = {}
        for table in tables:
            columns = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
            kept = [c for c in columns if c not in VOLATILE_COLUMNS.get(table, set())]
            rows = []
            for row in connection.execute(f"SELECT {', '.join(kept)} FROM {table}"):
                values = dict(zip(kept, row, strict=True))
                if table == "events" and values.get("action") in REFUSAL_ACTIONS:
                    continue
                job = values.get("id") if table == "jobs" else values.get("job_id")
                if job is not None and job in without_jobs:
                    continue
                rows.append(tuple(row))
            snapshot[table] = sorted(rows, key=repr)
        return snapshot
    finally:
        connection.close()


def snapshot_difference(before: TableRows, after: TableRows) -> dict[str, Any]:
    """Per table, the rows only before and only after (empty when equal)."""
    diff: dict[str, Any] = {}
    for table in sorted(set(before) | set(after)):
        old, new = set(before.get(table, [])), set(after.get(table, []))
        if old != new:
            diff[table] = {"gone": sorted(old - new, key=repr), "new": sorted(new - old, key=repr)}
    return diff


# --- an agent that keeps working ---------------------------------------------------


@dataclass
class Worker:
    """Runs ``scire-client run`` for one enrolled agent over and over, as cron
    would (faster), in a background thread; records every run that failed."""

    dep: Deployment
    name: str
    runs: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"worker-{self.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            proc = self.dep.agent(self.name, "run", timeout=120)
            self.runs += 1
            if proc.returncode != 0:
                self.failures.append(f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=150)


def job_latency(dep: Deployment, host: str, tag: str, timeout: float = 60) -> tuple[int, float]:
    """Submit a job for ``host`` with ``scire-admin``, wait until it is done;
    (job id, seconds from submit to done). The job must succeed."""
    started = time.monotonic()
    job_id = dep.submit("--command", f"echo {tag}", "--host", host, "--name", tag)
    job = dep.wait_job(job_id, timeout=timeout)
    elapsed = time.monotonic() - started
    assert job["state"] == "succeeded", job
    (assignment,) = job["assignments"]
    assert re.sub(r"\s+", "", assignment["output"] or "") == tag, assignment
    return job_id, elapsed
