#!/usr/bin/env python3
"""Benchmark of the dispatch path through a real server over mutual TLS.

Starts ``scire-server`` on SQLite (or ``--database-url``) in a temporary
directory, enrolls N agents straight in the database, submits J jobs per
agent, then runs one thread per agent that polls, acknowledges and reports
``succeeded`` until nothing is left. Prints jobs per second and the poll
latency percentiles, and with ``--write`` appends them to docs/BENCHMARKS.md.

    .venv/bin/python scripts/bench_dispatch.py --agents 20 --jobs 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from pathlib import Path

from scire_schema import certs, documents, files, tls
from scire_server import ca, store
from scire_server.store import Certificate, JobSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--jobs", type=int, default=50, help="jobs per agent")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--database-url", default="")
    p.add_argument("--write", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = p.parse_args()
    bin_dir = Path(sys.executable).parent
    root = Path(tempfile.mkdtemp(prefix="scire-bench-"))
    port = free_port()
    state = root / "server"
    db_args = ["--database-url", args.database_url] if args.database_url else []
    subprocess.run(
        [
            bin_dir / "scire-admin",
            "init",
            "--state-dir",
            state,
            "--listen-port",
            str(port),
            "--bundle",
            root / "admin.pem",
            *db_args,
        ],
        check=True,
        capture_output=True,
    )
    url = args.database_url or f"sqlite:///{state / 'scire.db'}"
    db = store.Store(store.make_engine(url), "bench")
    ca_key = certs.load_key((state / "ca.key").read_bytes())
    ca_cert = certs.load_cert((state / "ca.pem").read_bytes())
    owner, _ = db.directory.caller_by_fingerprint(db.directory.users()[0]["fingerprint"])
    assert owner is not None
    agents = []
    for i in range(args.agents):
        name = f"bench{i}"
        key = certs.generate_key()
        csr = certs.make_csr(key, name).decode()
        db.directory.register_client(
            name, csr, {}, None, key_fingerprint=certs.key_fingerprint(key)
        )
        cert = ca.sign_csr(ca_key, ca_cert, csr, name, ca.ROLE_CLIENT)
        certificate = Certificate(csr, certs.cert_to_pem(cert).decode(), certs.fingerprint(cert))
        db.directory.accept_client(name, certificate, "bench")
        files.write_private(root / f"{name}.key", certs.key_to_pem(key))
        files.write_public(root / f"{name}.pem", certs.cert_to_pem(cert))
        agents.append(name)
    spec = JobSpec(script="true", name="bench", timeout=60, output_limit=1024)
    for _ in range(args.jobs):
        db.jobs.submit(owner, spec, agents, [])
    db.close()

    server = subprocess.Popen(
        [
            bin_dir / "scire-server",
            "--state-dir",
            state,
            "--listen-port",
            str(port),
            "--log-level",
            "WARNING",
            *db_args,
        ],
        stderr=subprocess.DEVNULL,
    )
    latencies: list[float] = []
    lock = threading.Lock()
    done = [0]

    def agent(name: str) -> None:
        ctx = tls.client_context(state / "ca.pem", root / f"{name}.pem", root / f"{name}.key")
        proxy = xmlrpc.client.ServerProxy(
            f"https://127.0.0.1:{port}/",
            transport=xmlrpc.client.SafeTransport(context=ctx),
            allow_none=True,
        )
        while True:
            t0 = time.perf_counter()
            answer = proxy.agent.poll([], [], args.batch)
            with lock:
                latencies.append(time.perf_counter() - t0)
            jobs = [documents.parse_job(x) for x in answer["jobs"]]
            if not jobs:
                return
            proxy.agent.acknowledge(
                [{"job_id": j.job_id, "delivery_id": j.delivery_id} for j in jobs]
            )
            now = dt.datetime.now(dt.UTC)
            for j in jobs:
                proxy.agent.report(
                    documents.render_status(
                        documents.StatusReport(
                            job_id=j.job_id,
                            delivery_id=j.delivery_id,
                            state="succeeded",
                            exit_code=0,
                            started=now,
                            finished=now,
                            output="ok\n",
                        )
                    )
                )
            with lock:
                done[0] += len(jobs)

    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    start = time.perf_counter()
    threads = [threading.Thread(target=agent, args=(n,)) for n in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    total = args.agents * args.jobs
    assert done[0] == total, f"{done[0]} of {total} jobs done"
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    line = (
        f"| {dt.date.today()} | {'PostgreSQL' if args.database_url else 'SQLite'} | {args.agents} | "
        f"{total} | {args.batch} | {elapsed:.1f} s | {total / elapsed:.0f} | "
        f"{q[49] * 1000:.1f} / {q[94] * 1000:.1f} / {q[98] * 1000:.1f} ms |"
    )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"{total} jobs through {args.agents} agents in {elapsed:.1f} s: {total / elapsed:.0f} jobs/s; "
        f"poll p50 {q[49] * 1000:.1f} ms, p95 {q[94] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms ({machine})"
    )
    if args.write:
        bench = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
        if not bench.exists():
            bench.write_text(
                "# Benchmarks\n\n## Dispatch through a real server (mutual TLS, XML-RPC)\n\n"
                "`scripts/bench_dispatch.py`: N agent threads poll (batch B), acknowledge and report "
                "`succeeded` for every job until none is left; one server daemon, default settings.\n\n"
                "| date | database | agents | jobs | batch | wall time | jobs/s | poll p50 / p95 / p99 | machine |\n"
                "|---|---|---|---|---|---|---|---|---|\n"
            )
        with bench.open("a") as fh:
            fh.write(f"{line} {machine} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
