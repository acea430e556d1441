#!/usr/bin/env python3
"""``scripts/bench``: the server against a simulated fleet, side by side with
the ceiling of the stack it is built on.

Everything runs on 127.0.0.1: a real ``scire-server`` (SQLite, and PostgreSQL
in a throwaway cluster) and a fleet of simulated agents, processes x threads,
each thread one agent identity with its own certificate, calling through the
agent's own ``ServerTransport`` over mutual TLS. The identities are written
straight into the database (one key pair shared by all, one certificate each,
signed by the deployment's CA): that is set-up, not what is measured. The
history of finished assignments is loaded with bulk SQL inserts for the same
reason. What is measured:

* ceiling: a bare stdlib ``SimpleXMLRPCServer`` over TLS with the same
  certificates and a pool of ``max_threads`` threads, answering the same
  ``agent.poll`` with nothing, called the same way (keep-alive, and a new TLS
  connection per call);
* empty polls/s both ways, as a ratio to the ceiling; the server's CPU ms per
  empty poll (``/proc``) and its peak RSS;
* jobs/s end to end with thread agents in 4 processes, talking as the agent
  does (poll 10, acknowledge them as started, one ``agent.report_many`` of the
  finals), and with real ``scire-client daemon`` processes running ``true``;
* the empty poll with a large history (1,000,000 finished assignments over
  10,000 clients, 100,000 on the polling client), as a ratio to an empty
  database, with the poll cache on and off;
* a fleet soak: N agents at a poll interval, each on a new TLS connection per
  poll as a cron or an idle daemon's agent would be; the server's share of one
  core and the poll latency;
* overload: the answered polls/s with 4x the agents the server's pool
  serves, and how many were told to retry later;
* 2,000 idle agent connections: the server's RSS, and the empty-poll rate
  while they stay open.

``--quick`` (SQLite, small counts) takes under two minutes; the full run
writes a table and a plot into docs/BENCHMARKS.md with ``--write``;
``--daemons-only`` runs the two rows of the 50 daemon-mode agents alone (to
compare a change on the agent's side).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import multiprocessing as mp
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
import xmlrpc.server
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from scire_client.config import ClientConfig
from scire_client.exceptions import RetryLater, TransportError
from scire_client.transport import ReportAnswer, ServerTransport
from scire_schema import certs, documents, files, protocol, tls
from scire_server import ca
from scire_server.models import Assignment, Client, Job, User

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MAX_THREADS = 16  # the server's worker pool (its default), and the ceiling's
EMPTY_ANSWER = {"jobs": [], "reconcile": [], "poll_interval": 60}
PRESENCE = {"version": "bench", "mode": "daemon", "callback": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {process.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not listen on {port}")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def machine_busy_seconds() -> float:
    """CPU seconds this machine has spent busy since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the deployment ---------------------------------------------------------------


class Deployment:
    """A server's state directory, its CA, and agent identities in its database."""

    def __init__(self, root: Path, database_url: str = "") -> None:
        self.root = root
        self.state = root / "server"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/"
        self.db_args = ["--database-url", database_url] if database_url else []
        subprocess.run(
            [
                BIN / "scire-admin",
                "init",
                "--state-dir",
                self.state,
                "--listen-port",
                str(self.port),
                "--bundle",
                root / "admin.pem",
                *self.db_args,
            ],
            check=True,
            capture_output=True,
        )
        self.database_url = database_url or f"sqlite:///{self.state / 'scire.db'}"
        self.engine = sa.create_engine(self.database_url)
        self.ca_path = self.state / "ca.pem"
        self.ca_key = certs.load_key((self.state / "ca.key").read_bytes())
        self.ca_cert = certs.load_cert(self.ca_path.read_bytes())
        self.key = certs.generate_key()
        self.key_path = root / "agent-key.pem"
        files.write_private(self.key_path, certs.key_to_pem(self.key))
        (root / "ids").mkdir()
        self.names: list[str] = []
        self.server: subprocess.Popen[bytes] | None = None
        admin = tls.client_context(self.ca_path, root / "admin.pem", root / "admin.pem")
        self.admin = xmlrpc.client.ServerProxy(
            self.url, transport=tls.TLSTransport(admin, 60), allow_none=True
        )
        with self.engine.connect() as connection:
            self.owner_id = connection.execute(sa.select(User.id)).scalar_one()

    def cert_path(self, name: str) -> Path:
        return self.root / "ids" / f"{name}.pem"

    def enroll(self, count: int) -> list[str]:
        """Accepted identities ``sim00000``... up to ``count``, in one transaction."""
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        key_fingerprint = certs.key_fingerprint(self.key)
        rows = []
        for i in range(len(self.names), count):
            name = f"sim{i:05d}"
            cert = ca.issue_certificate(
                self.ca_key, self.ca_cert, self.key.public_key(), name, ca.ROLE_CLIENT
            )
            pem = certs.cert_to_pem(cert)
            self.cert_path(name).write_bytes(pem)
            rows.append(
                {
                    "name": name,
                    "status": "accepted",
                    "csr_pem": "(bench identity)",
                    "key_fingerprint": key_fingerprint,
                    "cert_pem": pem.decode(),
                    "fingerprint": certs.fingerprint(cert),
                    "facts": {},
                    "registered_at": now,
                    "decided_at": now,
                    "decided_by": "bench",
                }
            )
            self.names.append(name)
        if rows:
            with self.engine.begin() as connection:
                connection.execute(sa.insert(Client.__table__), rows)
        return self.names[:count]

    def client_ids(self, names: list[str]) -> dict[str, int]:
        with self.engine.connect() as connection:
            return {
                name: cid
                for name, cid in connection.execute(
                    sa.select(Client.name, Client.id).where(Client.name.in_(names))
                )
            }

    def load_history(self, spread: int, per_client: int, polling: str, own: int) -> int:
        """Finished assignments: ``per_client`` for each of the first ``spread``
        identities and ``own`` more for ``polling``; bulk SQL, in batches."""
        ids = self.client_ids(self.names[:spread] + [polling])
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=1)
        total = 0
        with self.engine.begin() as connection:
            first_job = (connection.execute(sa.select(sa.func.max(Job.id))).scalar() or 0) + 1
            jobs = per_client + own
            connection.execute(
                sa.insert(Job.__table__),
                [
                    {
                        "id": first_job + j,
                        "name": "history",
                        "script": "true",
                        "interpreter": "/bin/sh",
                        "privilege": "run",
                        "priority": 0,
                        "timeout": 60,
                        "output_limit": 1024,
                        "max_attempts": 1,
                        "owner_id": self.owner_id,
                        "created_at": now,
                        "rerun_on_agent_crash": False,
                    }
                    for j in range(jobs)
                ],
            )

            def rows(job_ids: range, clients: list[int]) -> Iterator[dict[str, Any]]:
                for job_id in job_ids:
                    for client_id in clients:
                        yield {
                            "job_id": job_id,
                            "client_id": client_id,
                            "state": "succeeded",
                            "priority": 0,
                            "job_created_at": now,
                            "attempt": 1,
                            "retry_base": 0,
                            "delivery_id": "0" * 32,
                            "exit_code": 0,
                            "finished_at": now,
                            "output_truncated": False,
                            "updated_at": now,
                        }

            spread_ids = [ids[n] for n in self.names[:spread]]
            batch: list[dict[str, Any]] = []
            for row in rows(range(first_job, first_job + per_client), spread_ids):
                batch.append(row)
                if len(batch) == 20_000:
                    connection.execute(sa.insert(Assignment.__table__), batch)
                    total += len(batch)
                    batch = []
            own_jobs = range(first_job + per_client, first_job + per_client + own)
            for row in rows(own_jobs, [ids[polling]]):
                batch.append(row)
                if len(batch) == 20_000:
                    connection.execute(sa.insert(Assignment.__table__), batch)
                    total += len(batch)
                    batch = []
            if batch:
                connection.execute(sa.insert(Assignment.__table__), batch)
                total += len(batch)
        if self.database_url.startswith("sqlite"):
            with self.engine.connect() as connection:
                connection.exec_driver_sql("ANALYZE")
        else:
            # What autovacuum would have done to a year of history long ago;
            # left to run during the measurement, it takes a core from the server.
            autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            with autocommit.connect() as connection:
                connection.execute(sa.text("VACUUM ANALYZE"))
                connection.execute(sa.text("CHECKPOINT"))
        return total

    def start_server(self, **settings: Any) -> subprocess.Popen[bytes]:
        stop(self.server)
        ini = self.root / "server.ini"
        # Room for the idle-connection test: 127.0.0.1 is one peer for the whole fleet.
        values = {
            "max_threads": MAX_THREADS,
            "log_level": "WARNING",
            "max_connections": 20000,
            "max_connections_per_peer": 20000,
            # Longer than the soak's poll interval: a daemon's kept-alive connection
            # outlives the wait between its polls.
            "idle_timeout": 120,
        } | settings
        ini.write_text("[server]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the process owns it
        self.server = subprocess.Popen(
            [
                BIN / "scire-server",
                "--config",
                ini,
                "--state-dir",
                self.state,
                "--listen-port",
                str(self.port),
                *self.db_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        wait_port(self.port, self.server, "scire-server")
        for _ in range(100):
            with contextlib.suppress(OSError, xmlrpc.client.ProtocolError):
                self.admin.admin.whoami()
                break
            time.sleep(0.1)
        return self.server

    def stop_server(self) -> None:
        stop(self.server)
        self.server = None


# --- the ceiling: the stdlib server over the same TLS -------------------------------


class _PooledTLSServer(socketserver.ThreadingMixIn, xmlrpc.server.SimpleXMLRPCServer):
    """``SimpleXMLRPCServer`` with mutual TLS and a bounded pool of threads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, threads: int) -> None:
        self.context = context
        self.pool = ThreadPoolExecutor(threads)

        class Handler(xmlrpc.server.SimpleXMLRPCRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the agents use it

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(address, Handler, logRequests=False, allow_none=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.pool.submit(self._handle, request, client_address)

    def _handle(self, request: socket.socket, client_address: Any) -> None:
        try:
            wrapped = self.context.wrap_socket(request, server_side=True)
            self.finish_request(wrapped, client_address)
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.shutdown_request(request)


def serve_ceiling(port: int, cert: str, key: str, ca_path: str, threads: int) -> None:
    """Run in a child process until killed."""
    context = tls.server_context(Path(cert), Path(key), Path(ca_path))
    server = _PooledTLSServer(("127.0.0.1", port), context, threads)
    server.register_function(lambda *args: EMPTY_ANSWER, "agent.poll")
    server.serve_forever()


def start_ceiling(deployment: Deployment) -> tuple[mp.Process, str]:
    port = free_port()
    process = mp.get_context("spawn").Process(
        target=serve_ceiling,
        args=(
            port,
            str(deployment.state / "server.pem"),
            str(deployment.state / "server.key"),
            str(deployment.ca_path),
            MAX_THREADS,
        ),
        daemon=True,
    )
    process.start()
    for _ in range(200):
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        time.sleep(0.05)
    return process, f"https://127.0.0.1:{port}/"


# --- the simulated fleet -------------------------------------------------------------


def _transport(url: str, ca_path: str, cert: str, key: str, scratch: Path) -> ServerTransport:
    config = ClientConfig.load(
        None, state_dir=scratch, name=Path(cert).stem, servers=[url], ca_file=ca_path
    )
    context = tls.client_context(Path(ca_path), Path(cert), Path(key))
    return ServerTransport(config, context, remember=False)


FIRST_ROUND_LIMIT = 600.0  # seconds: every soak agent's first poll, or the run gives up


@dataclasses.dataclass
class LoadResult:
    calls: int = 0
    errors: int = 0
    told_to_wait: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    first_round: float = 0.0  # seconds until every agent had polled once (soak)

    def add(self, other: LoadResult) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.told_to_wait += other.told_to_wait
        self.latencies += other.latencies

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def _poll_process(
    url: str,
    ca_path: str,
    key: str,
    certs_: list[str],
    seconds: float,
    new_connection: bool,
    interval: float,
    start_at: float,
    queue: Any,
    first_round: Any = None,
    counted_from_shared: Any = None,
) -> None:
    """Child process: one thread per group of identities; each identity polls
    empty, back to back (``interval`` 0) or once per ``interval`` from a random
    phase; a new TLS connection per call with ``new_connection``.

    With an ``interval``, every identity first polls once, back to back and not
    counted (a fleet meeting a daemon that has just started: each first poll
    reads the database); ``first_round`` (a barrier over all threads of all
    processes) then sets ``counted_from_shared`` and the steady state is
    counted from there. As a daemon does, an identity that falls behind polls
    once and then waits a whole interval again, never catching up in a burst."""
    scratch = Path(tempfile.mkdtemp(prefix="scire-bench-agent-"))
    result = LoadResult()
    lock = threading.Lock()
    threads_wanted = len(certs_) if interval == 0 else min(len(certs_), 32)
    groups = [certs_[i::threads_wanted] for i in range(threads_wanted)]

    def agent(group: list[str]) -> None:
        mine = LoadResult()
        transports = [_transport(url, ca_path, c, key, scratch) for c in group]
        while time.time() < start_at:
            time.sleep(0.005)
        counted_from = start_at
        if interval:
            for transport in transports:
                try:
                    transport.poll([], [], 10, PRESENCE)
                except RetryLater:
                    mine.told_to_wait += 1
                except TransportError:
                    mine.errors += 1
                if new_connection:
                    transport.close()
            first_round.wait(timeout=FIRST_ROUND_LIMIT)
            counted_from = counted_from_shared.value
        end = counted_from + seconds
        due = [counted_from + random.uniform(0, interval) for _ in group]
        while True:
            if interval:
                i = min(range(len(group)), key=due.__getitem__)
                wait = due[i] - time.time()
                if due[i] >= end:
                    break
                if wait > 0:
                    time.sleep(wait)
            else:
                i = 0
                if time.time() >= end:
                    break
            began = time.perf_counter()
            counted = time.time() >= counted_from
            try:
                transports[i].poll([], [], 10, PRESENCE)
                if counted:
                    mine.calls += 1
                    mine.latencies.append(time.perf_counter() - began)
            except RetryLater as exc:
                mine.told_to_wait += 1
                if not interval:
                    time.sleep(min(exc.seconds, 1.0) * random.uniform(0.5, 1.0))
            except TransportError:
                mine.errors += 1
            if new_connection:
                transports[i].close()
            if interval:
                due[i] = max(due[i] + interval, time.time() + interval * 0.9)
        for transport in transports:
            transport.close()
        with lock:
            result.add(mine)

    threads = [threading.Thread(target=agent, args=(g,)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shutil.rmtree(scratch, ignore_errors=True)
    if len(result.latencies) > 20_000:
        result.latencies = random.sample(result.latencies, 20_000)
    queue.put(result)


def run_fleet(
    url: str,
    deployment: Deployment,
    names: list[str],
    seconds: float,
    *,
    processes: int = 2,
    new_connection: bool = False,
    interval: float = 0.0,
    server_pid: int | None = None,
) -> tuple[LoadResult, float]:
    """Empty polls from ``names`` for ``seconds``; the result and the server's
    CPU seconds meanwhile. With an ``interval``, after a first round that is
    not counted (its length in ``LoadResult.first_round``)."""
    context = mp.get_context("fork")
    queue = context.Queue()
    processes = max(1, min(processes, len(names)))
    start_at = time.time() + 1.0 + len(names) / 2000  # every agent set up first
    counted_from = context.Value("d", 0.0)

    def first_round_done() -> None:
        counted_from.value = time.time()

    threads = sum(
        len(names[i::processes]) if not interval else min(len(names[i::processes]), 32)
        for i in range(processes)
    )
    first_round = context.Barrier(threads, action=first_round_done)
    children = [
        context.Process(
            target=_poll_process,
            args=(
                url,
                str(deployment.ca_path),
                str(deployment.key_path),
                [str(deployment.cert_path(n)) for n in names[i::processes]],
                seconds,
                new_connection,
                interval,
                start_at,
                queue,
                first_round,
                counted_from,
            ),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    while time.time() < start_at:
        time.sleep(0.01)
    result = LoadResult(seconds=seconds)
    if interval:
        while not counted_from.value:
            if time.time() > start_at + FIRST_ROUND_LIMIT:
                raise SystemExit(f"bench: the soak's first round took over {FIRST_ROUND_LIMIT} s")
            time.sleep(0.01)
        result.first_round = counted_from.value - start_at
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    for _ in children:
        result.add(queue.get(timeout=seconds + 600))
    cpu = (cpu_seconds(server_pid) - cpu_before) if server_pid else 0.0
    for child in children:
        child.join(30)
    return result, cpu


# --- jobs end to end ------------------------------------------------------------------


def submit_bulk(deployment: Deployment, hosts: list[str], jobs: int) -> float:
    """``jobs`` jobs, each for every host in ``hosts``, through the admin API;
    returns the time it took."""
    began = time.perf_counter()
    for i in range(jobs):
        deployment.admin.admin.job_submit(
            {"script": "true", "name": f"bench-{i}", "hosts": hosts, "timeout": 60}
        )
    return time.perf_counter() - began


def _job_agent(url: str, ca_path: str, key: str, cert: str, out: list[Any], lock: Any) -> None:
    """A thread agent as the real one talks: poll, acknowledge the batch as
    started (no running reports), report the finals in one call, until a poll
    brings nothing."""
    scratch = Path(tempfile.mkdtemp(prefix="scire-bench-agent-"))
    transport = _transport(url, ca_path, cert, key, scratch)
    done: list[float] = []
    while True:
        answer = transport.poll([], [], 10, PRESENCE)
        if not answer.jobs:
            break
        docs = [job.doc for job in answer.jobs]
        started = protocol.utc_now()
        transport.acknowledge(
            [(doc.job_id, doc.delivery_id) for doc in docs], {doc.job_id: started for doc in docs}
        )
        finals = [
            documents.render_status(
                documents.StatusReport(
                    doc.job_id,
                    doc.delivery_id,
                    "succeeded",
                    0,
                    started,
                    protocol.utc_now(),
                    output="",
                )
            )
            for doc in docs
        ]
        for outcome in transport.report_many(finals):
            if not isinstance(outcome, ReportAnswer):
                raise SystemExit(f"bench: a report was refused: {outcome}")
        for doc in docs:
            created = doc.created if doc.created.tzinfo else doc.created.replace(tzinfo=dt.UTC)
            done.append((protocol.utc_now() - created).total_seconds())
    transport.close()
    shutil.rmtree(scratch, ignore_errors=True)
    with lock:
        out.extend(done)


def _job_process(
    url: str, ca_path: str, key: str, certs: list[str], start_at: float, queue: Any
) -> None:
    """One process of thread agents (its own GIL): starts them at ``start_at``,
    puts the submit→final times of all their jobs on ``queue``."""
    done: list[float] = []
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_job_agent, args=(url, ca_path, key, cert, done, lock))
        for cert in certs
    ]
    time.sleep(max(0.0, start_at - time.time()))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put(done)


def jobs_end_to_end(
    deployment: Deployment, agents: int, per_agent: int, processes: int = 4
) -> dict[str, float]:
    """Bulk-submit ``per_agent`` jobs for each of ``agents`` hosts, then let
    ``processes`` processes of thread agents run them all."""
    names = deployment.names[:agents]
    submit_seconds = submit_bulk(deployment, names, per_agent)
    context = mp.get_context("fork")
    queue = context.Queue()
    processes = max(1, min(processes, len(names)))
    start_at = time.time() + 1.0
    children = [
        context.Process(
            target=_job_process,
            args=(
                deployment.url,
                str(deployment.ca_path),
                str(deployment.key_path),
                [str(deployment.cert_path(n)) for n in names[i::processes]],
                start_at,
                queue,
            ),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    assert deployment.server is not None
    while time.time() < start_at:
        time.sleep(0.001)
    cpu_before = cpu_seconds(deployment.server.pid)
    began = time.perf_counter()
    done: list[float] = []
    for _ in children:
        done += queue.get(timeout=600)
    seconds = time.perf_counter() - began
    cpu = cpu_seconds(deployment.server.pid) - cpu_before
    for child in children:
        child.join(30)
    total = agents * per_agent
    if len(done) != total:
        raise SystemExit(f"bench: {len(done)} of {total} jobs came back")
    return {
        "jobs": total,
        "seconds": seconds,
        "jobs_per_s": total / seconds,
        "submit_per_s": total / submit_seconds,
        "server_cpu_ms_per_job": cpu * 1000 / total,
        "p50": statistics.median(done),
        "p99": percentile(done, 0.99),
    }


# --- daemon-mode agents ------------------------------------------------------------------


class DaemonFleet:
    """Real ``scire-client daemon`` processes with ``poll_now`` listeners."""

    def __init__(self, deployment: Deployment, count: int) -> None:
        self.deployment = deployment
        self.names = deployment.names[:count]
        self.processes: list[subprocess.Popen[bytes]] = []
        for name in self.names:
            state = deployment.root / "daemons" / name
            state.mkdir(parents=True, mode=0o700)
            shutil.copy(deployment.key_path, state / "key.pem")
            os.chmod(state / "key.pem", 0o600)
            shutil.copy(deployment.cert_path(name), state / "cert.pem")
            shutil.copy(deployment.ca_path, state / "ca.pem")

    def start(self) -> None:
        self.processes = [self._spawn(name) for name in self.names]
        deadline = time.monotonic() + 180
        ready: list[str] = []
        while time.monotonic() < deadline:
            # A daemon that exited (its poll_now port was taken between free_port
            # and its bind, say) is started again on another port.
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    print(f"  bench: daemon {self.names[index]} exited; starting it again")
                    self.processes[index] = self._spawn(self.names[index])
            ready = [
                c["name"]
                for c in self.deployment.admin.admin.client_list()
                if c["name"] in self.names and c.get("callback_address") and c["online"]
            ]
            if len(ready) == len(self.names):
                return
            time.sleep(0.3)
        missing = sorted(set(self.names) - set(ready))
        log = self.deployment.root / "daemons" / missing[0] / "agent.log"
        tail = log.read_text(errors="replace").splitlines()[-10:] if log.exists() else []
        raise SystemExit(
            f"bench: only {len(ready)} of {len(self.names)} daemons came up; "
            f"{missing[0]}'s log ends:\n" + "\n".join(tail)
        )

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        state = self.deployment.root / "daemons" / name
        with open(state / "agent.log", "ab") as log:
            return subprocess.Popen(
                [
                    BIN / "scire-client",
                    "--server",
                    self.deployment.url,
                    "--state-dir",
                    state,
                    "--name",
                    name,
                    "--poll-interval",
                    "60",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "daemon",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    def stop(self) -> None:
        for process in self.processes:
            stop(process)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes if p.poll() is None)

    def wait_final(self, job_ids: list[int], timeout: float = 300) -> None:
        """Until every assignment of the jobs is final: read from the database
        every 10 ms (asking the server would cost the server what it measures)."""
        deadline = time.monotonic() + timeout
        live = sa.text(
            "SELECT count(*) FROM assignments WHERE job_id IN :ids AND state NOT IN :final"
        ).bindparams(sa.bindparam("ids", expanding=True), sa.bindparam("final", expanding=True))
        final = sorted(FINAL_ASSIGNMENT)
        while True:
            with self.deployment.engine.connect() as connection:
                if not connection.scalar(live, {"ids": job_ids, "final": final}):
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: jobs {job_ids} did not finish")
            time.sleep(0.01)

    def burst(self, per_agent: int) -> dict[str, float]:
        agent_cpu = self.cpu_seconds()
        machine_cpu = machine_busy_seconds()
        began = time.perf_counter()
        job_ids = [
            self.deployment.admin.admin.job_submit(
                {"script": "true", "name": "burst", "hosts": self.names, "timeout": 60}
            )["job_id"]
            for _ in range(per_agent)
        ]
        self.wait_final(job_ids)
        seconds = time.perf_counter() - began
        results = per_agent * len(self.names)
        return {
            "results": results,
            "seconds": seconds,
            "results_per_s": results / seconds,
            "agent_cpu_ms_per_job": (self.cpu_seconds() - agent_cpu) * 1000 / results,
            # Everything: server, daemons, each job's wrapper and shell, this script.
            "machine_cpu_ms_per_job": (machine_busy_seconds() - machine_cpu) * 1000 / results,
        }

    def single(self, rounds: int) -> dict[str, float]:
        times = []
        for _ in range(rounds):
            began = time.perf_counter()
            job_id = self.deployment.admin.admin.job_submit(
                {"script": "true", "name": "all", "hosts": self.names, "timeout": 60}
            )["job_id"]
            self.wait_final([job_id])
            times.append(time.perf_counter() - began)
        return {"p50": statistics.median(times), "max": max(times), "rounds": rounds}


FINAL_ASSIGNMENT = {"succeeded", "failed", "timed_out", "denied", "expired", "cancelled"}


# --- idle connections ----------------------------------------------------------------------


def open_idle(
    url: str, deployment: Deployment, names: list[str], count: int
) -> list[ssl.SSLSocket]:
    """``count`` TLS connections with handshakes done, sending nothing."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    sockets = []
    for i in range(count):
        name = names[i % len(names)]
        context = tls.client_context(
            deployment.ca_path, deployment.cert_path(name), deployment.key_path
        )
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        sockets.append(context.wrap_socket(raw, server_hostname="127.0.0.1"))
    return sockets


# --- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Sizes:
    seconds: float  # per throughput measurement
    poll_agents: int
    job_agents: int
    jobs_per_agent: int
    daemons: int
    daemon_burst: int
    single_rounds: int
    history_spread: int
    history_per_client: int
    history_own: int
    soak_agents: int
    soak_interval: float
    soak_seconds: float
    idle_connections: int
    fleet_sizes: tuple[int, ...]
    history_runs: int = 3  # runs per history measurement, their median reported


QUICK = Sizes(3, 8, 8, 40, 10, 5, 3, 1000, 20, 5000, 1000, 6.0, 6, 300, (4, 16), history_runs=1)
FULL = Sizes(
    8, 8, 16, 150, 50, 10, 5, 10_000, 100, 100_000, 10_000, 60.0, 60, 2000, (4, 16, 64, 256)
)


@dataclasses.dataclass
class Row:
    what: str
    figure: str
    target: str = ""
    met: str = ""


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.plot: dict[str, list[tuple[int, float]]] = {}

    def add(self, what: str, figure: str, target: str = "", met: bool | None = None) -> None:
        row = Row(what, figure, target, "" if met is None else ("met" if met else "missed"))
        self.rows.append(row)
        print(
            f"  {what}: {figure}" + (f"  [target {target}: {row.met}]" if target else ""),
            flush=True,
        )

    def table(self) -> str:
        lines = ["| measurement | figure | target | |", "|---|---|---|---|"]
        lines += [f"| {r.what} | {r.figure} | {r.target} | {r.met} |" for r in self.rows]
        return "\n".join(lines)


def bench_daemons(label: str, deployment: Deployment, sizes: Sizes, report: Report) -> None:
    """The rows of real ``scire-client daemon`` processes: one job on all, then a burst."""
    print(f"== {label}: {sizes.daemons} daemon-mode agents", flush=True)
    fleet = DaemonFleet(deployment, sizes.daemons)
    try:
        fleet.start()
        single = fleet.single(sizes.single_rounds)
        burst = fleet.burst(sizes.daemon_burst)
    finally:
        fleet.stop()
    report.add(
        f"{label}: burst of {sizes.daemon_burst} jobs on each of {sizes.daemons} daemons",
        f"{burst['results_per_s']:.0f} results/s ({burst['results']:.0f} in "
        f"{burst['seconds']:.1f} s); agent CPU {burst['agent_cpu_ms_per_job']:.0f} ms per job, "
        f"whole machine {burst['machine_cpu_ms_per_job']:.0f} ms of CPU per job",
        ">= 300 results/s (50 daemons)",
        burst["results_per_s"] >= 300 if sizes.daemons >= 50 else None,
    )
    report.add(
        f"{label}: one job on all {sizes.daemons} daemons, submit to last report",
        f"p50 {single['p50']:.2f} s, max {single['max']:.2f} s over {single['rounds']:.0f} rounds",
        "< 0.35 s p50 (50 daemons)",
        single["p50"] < 0.35 if sizes.daemons >= 50 else None,
    )


def bench_database(label: str, database_url: str, sizes: Sizes, report: Report, full: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"scire-bench-{label}-"))
    deployment = Deployment(root, database_url)
    ceiling: mp.Process | None = None
    try:
        print(f"== {label}: enrolling {sizes.soak_agents} identities", flush=True)
        deployment.enroll(max(sizes.soak_agents, sizes.history_spread + 1, 300))
        poll_names = deployment.names[: sizes.poll_agents]
        server = deployment.start_server()
        ceiling, ceiling_url = start_ceiling(deployment)
        rates: dict[str, float] = {}
        for way, new in (("keep-alive", False), ("new connection per call", True)):
            top, _ = run_fleet(
                ceiling_url, deployment, poll_names, sizes.seconds, new_connection=new
            )
            ours, cpu = run_fleet(
                deployment.url,
                deployment,
                poll_names,
                sizes.seconds,
                new_connection=new,
                server_pid=server.pid,
            )
            rates[way] = ours.rate
            ratio = ours.rate / top.rate if top.rate else 0.0
            goal = 0.6 if not new else 0.8
            report.add(f"{label}: ceiling (stdlib no-op), {way}", f"{top.rate:.0f} calls/s")
            report.add(
                f"{label}: empty polls, {way}",
                f"{ours.rate:.0f}/s = {ratio:.0%} of the ceiling; "
                f"{cpu * 1000 / max(ours.calls, 1):.2f} ms server CPU per poll; "
                f"p50 {percentile(ours.latencies, 0.5) * 1000:.1f} ms, "
                f"p99 {percentile(ours.latencies, 0.99) * 1000:.1f} ms",
                f">= {goal:.0%} of the ceiling",
                ratio >= goal,
            )
        stop_ceiling = ceiling
        stop_ceiling.kill()
        ceiling = None
        report.add(
            f"{label}: server peak RSS so far", f"{memory_kib(server.pid, 'VmHWM') / 1024:.0f} MB"
        )

        print(f"== {label}: jobs end to end, thread agents", flush=True)
        e2e = jobs_end_to_end(deployment, sizes.job_agents, sizes.jobs_per_agent)
        keepalive_ceiling = next(
            float(r.figure.split()[0])
            for r in report.rows
            if r.what == f"{label}: ceiling (stdlib no-op), keep-alive"
        )
        report.add(
            f"{label}: jobs end to end, {sizes.job_agents} thread agents in 4 processes",
            f"{e2e['jobs_per_s']:.0f} jobs/s ({e2e['jobs']:.0f} jobs in {e2e['seconds']:.1f} s, "
            f"= {e2e['jobs_per_s'] / keepalive_ceiling:.0%} of the keep-alive ceiling); "
            f"{e2e['server_cpu_ms_per_job']:.2f} ms server CPU per job; submit→final p50 "
            f"{e2e['p50']:.2f} s, p99 {e2e['p99']:.2f} s; bulk submit {e2e['submit_per_s']:.0f} "
            "assignments/s",
            ">= 25% of the keep-alive ceiling",
            e2e["jobs_per_s"] / keepalive_ceiling >= 0.25,
        )

        if full or label == "SQLite":
            bench_daemons(label, deployment, sizes, report)

        print(f"== {label}: overload, {4 * MAX_THREADS} agents polling back to back", flush=True)
        for cache in ("off",):
            deployment.start_server(poll_cache_check=0)
            base, _ = run_fleet(
                deployment.url, deployment, deployment.names[:MAX_THREADS], sizes.seconds
            )
            over, _ = run_fleet(
                deployment.url,
                deployment,
                deployment.names[: 4 * MAX_THREADS],
                sizes.seconds,
                processes=4,
            )
            report.add(
                f"{label}: overload (poll cache {cache}: every poll reads the database)",
                f"{MAX_THREADS} agents {base.rate:.0f} polls/s; {4 * MAX_THREADS} agents "
                f"{over.rate:.0f} polls/s ({over.rate / base.rate:.0%}), {over.told_to_wait} "
                f"told to retry later, {over.errors} errors",
                "flat, not collapsing",
                over.rate >= 0.8 * base.rate,
            )

        print(f"== {label}: fleet sizes", flush=True)
        server = deployment.start_server()
        for size in sizes.fleet_sizes:
            names = deployment.names[:size]
            result, _ = run_fleet(
                deployment.url,
                deployment,
                names,
                sizes.seconds,
                processes=2 if size < 64 else 4,
                server_pid=server.pid,
            )
            report.plot.setdefault(f"{label} empty polls/s", []).append((size, result.rate))
            report.add(
                f"{label}: {size} agents polling back to back",
                f"{result.rate:.0f} polls/s, "
                f"p99 {percentile(result.latencies, 0.99) * 1000:.0f} ms",
            )

        # Before the soak: its 10,000 kept-alive connections raise the RSS for good
        # (glibc keeps the freed memory), which would hide what these cost.
        print(f"== {label}: {sizes.idle_connections} idle connections", flush=True)
        before = memory_kib(server.pid, "VmRSS")
        idle = open_idle(deployment.url, deployment, deployment.names, sizes.idle_connections)
        time.sleep(1)
        during = memory_kib(server.pid, "VmRSS")
        with_idle, _ = run_fleet(deployment.url, deployment, poll_names, sizes.seconds)
        for sock in idle:
            sock.close()
        report.add(
            f"{label}: {sizes.idle_connections} idle agent connections open",
            f"server RSS {before / 1024:.0f} MB -> {during / 1024:.0f} MB "
            f"({(during - before) / sizes.idle_connections:.0f} KiB per connection); empty polls "
            f"{with_idle.rate:.0f}/s (keep-alive, {with_idle.rate / rates['keep-alive']:.0%} of "
            "the rate without them)",
            "< 300 MB, rate unchanged",
            during / 1024 < 300 and with_idle.rate >= 0.9 * rates["keep-alive"],
        )

        print(
            f"== {label}: soak, {sizes.soak_agents} agents every {sizes.soak_interval:g} s",
            flush=True,
        )
        names = deployment.names[: sizes.soak_agents]
        for way, new in (
            ("a new TLS connection per poll", True),
            ("kept-alive connections", False),
        ):
            # Each agent's first poll (not counted) reads the database: its
            # certificate, its work and its presence; the steady state follows.
            soak, cpu = run_fleet(
                deployment.url,
                deployment,
                names,
                sizes.soak_seconds,
                processes=4,
                new_connection=new,
                interval=sizes.soak_interval,
                server_pid=server.pid,
            )
            share = cpu / sizes.soak_seconds
            report.add(
                f"{label}: soak, {sizes.soak_agents} agents at {sizes.soak_interval:g} s for "
                f"{sizes.soak_seconds:g} s after every agent's first poll, {way}",
                f"{soak.rate:.0f} polls/s, server {share:.0%} of one core, poll p50 "
                f"{percentile(soak.latencies, 0.5) * 1000:.1f} ms, p99 "
                f"{percentile(soak.latencies, 0.99) * 1000:.1f} ms, {soak.errors} errors; "
                f"the first polls of all {len(names):,} took {soak.first_round:.1f} s; "
                f"server peak RSS {memory_kib(server.pid, 'VmHWM') / 1024:.0f} MB",
                "< 25% of one core (10,000 at 60 s)",
                share < 0.25 if sizes.soak_agents >= 10_000 else None,
            )

        print(f"== {label}: history", flush=True)
        polling = deployment.names[sizes.history_spread]
        results = {}

        def median_rate() -> float:
            # Several runs (full mode): one short run varies by 10 % or more on a shared machine.
            rates = [
                run_fleet(deployment.url, deployment, [polling] * 4, sizes.seconds)[0].rate
                for _ in range(sizes.history_runs)
            ]
            return statistics.median(rates)

        for cache in ("on", "off"):
            settings = {} if cache == "on" else {"poll_cache_check": 0}
            deployment.start_server(**settings)
            results[cache] = median_rate()
        loaded = deployment.load_history(
            sizes.history_spread, sizes.history_per_client, polling, sizes.history_own
        )
        runs = f" (medians of {sizes.history_runs} runs)" if sizes.history_runs > 1 else ""
        for cache in ("on", "off"):
            settings = {} if cache == "on" else {"poll_cache_check": 0}
            deployment.start_server(**settings)
            big = median_rate()
            cost = results[cache] / big if big else float("inf")
            report.add(
                f"{label}: empty poll with {loaded:,} finished assignments "
                f"({sizes.history_own:,} on the polling client), poll cache {cache}",
                f"{big:.0f}/s vs {results[cache]:.0f}/s empty{runs}: cost x{cost:.2f}",
                "<= 1.1x the empty database",
                cost <= 1.1,
            )
        report.add(
            f"{label}: server peak RSS",
            f"{memory_kib(deployment.server.pid, 'VmHWM') / 1024:.0f} MB"
            if deployment.server
            else "-",
        )
    finally:
        if ceiling is not None:
            ceiling.kill()
        deployment.stop_server()
        deployment.engine.dispose()
        shutil.rmtree(root, ignore_errors=True)


def _pg(tool: str) -> str:
    """A PostgreSQL binary: on PATH, else the newest under /usr/lib/postgresql."""
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3])
    )
    if not candidates:
        raise SystemExit(
            f"bench: PostgreSQL's {tool} is not installed (apt-get install postgresql)"
        )
    return str(candidates[-1])


@contextlib.contextmanager
def postgresql() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (as the ``postgres`` user when root)."""
    base = Path(tempfile.mkdtemp(prefix="scire-bench-pg-"))
    os.chmod(base, 0o755)
    data = base / "data"
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, _pg("initdb"), "-D", data, "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            _pg("pg_ctl"),
            "-D",
            data,
            "-l",
            base / "pg.log",
            "-w",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [
                *as_user,
                _pg("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "scire",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/scire"
    finally:
        subprocess.run(
            [*as_user, _pg("pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, load {load:.1f} at the start"
    )


def write_docs(report: Report, command: str, facts: str, seconds: float) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    plot = ROOT / "docs" / "bench-fleet.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, points in report.plot.items():
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("agents polling back to back (keep-alive)")
    axes.set_ylabel("empty polls answered per second")
    axes.set_title("scire-server: throughput against fleet size")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(plot, dpi=100)
    section = (
        "## Fleet scale (`scripts/bench`, issue 10)\n\n"
        f"`{command}` on {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min; {facts}. The server and"
        " the simulated fleet share the machine's cores.\n\n"
        + report.table()
        + "\n\n![throughput against fleet size](bench-fleet.png)\n"
    )
    text = doc.read_text()
    marker = "## Fleet scale (`scripts/bench`, issue 10)"
    if marker in text:
        head, _, rest = text.partition(marker)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        head, _, rest = text.partition("\n## ")
        text = head + "\n" + section + "\n## " + rest
    doc.write_text(text)
    print(f"wrote {doc} and {plot}")


def daemons_only() -> int:
    """The daemon rows alone, as in the full run: to compare an agent-side change."""
    root = Path(tempfile.mkdtemp(prefix="scire-bench-daemons-"))
    deployment = Deployment(root, "")
    report = Report()
    print(f"scripts/bench --daemons-only on {machine()}", flush=True)
    try:
        deployment.enroll(FULL.daemons)
        deployment.start_server()
        bench_daemons("SQLite", deployment, FULL, report)
    finally:
        deployment.stop_server()
        deployment.engine.dispose()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{report.table()}")
    return 0


def main() -> int:
    # The soak holds one connection per agent: 10,000 descriptors on each side.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, SQLite only, < 2 min")
    parser.add_argument(
        "--database", default="", help="sqlite,postgresql (default: both; quick: sqlite)"
    )
    parser.add_argument(
        "--write", action="store_true", help="the table and plot into docs/BENCHMARKS.md"
    )
    parser.add_argument(
        "--daemons-only",
        action="store_true",
        help="only the daemon-mode agents' rows (full sizes, SQLite); nothing written",
    )
    args = parser.parse_args()
    if args.daemons_only:
        return daemons_only()
    sizes = QUICK if args.quick else FULL
    databases = (args.database or ("sqlite" if args.quick else "sqlite,postgresql")).split(",")
    report = Report()
    facts = machine()
    print(f"scripts/bench on {facts}", flush=True)
    began = time.monotonic()
    for database in databases:
        if database == "sqlite":
            bench_database("SQLite", "", sizes, report, not args.quick)
        elif database == "postgresql":
            with postgresql() as url:
                bench_database("PostgreSQL", url, sizes, report, not args.quick)
        else:
            parser.error(f"unknown database {database!r}: sqlite or postgresql")
    seconds = time.monotonic() - began
    print(f"\n{report.table()}\n\n{seconds:.0f} s")
    if args.write:
        write_docs(report, "scripts/bench " + shlex.join(sys.argv[1:]), facts, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
