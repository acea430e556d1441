#!/usr/bin/env python3
"""Benchmark of submit-to-done latency through daemon-mode agents, push on and off.

For each fleet size N: a server on SQLite in a temporary directory, N agents
enrolled straight in the database and started as real ``scire-client daemon``
processes on localhost, each with a ``poll_now`` listener and a long poll
interval. Then, with the server's push on and again with it off (the server is
restarted; the agents stay):

* latency: S jobs running ``true``, one at a time, each for one agent in turn,
  timed from ``job submit`` to the job's final state as ``admin.job_show``
  reports it (checked every 10 ms);
* throughput: one burst of B jobs for every agent at once, timed until all are
  final.

Prints p50 and p99 and jobs per second; ``--write`` appends the table to
docs/BENCHMARKS.md with the command and the machine.

    .venv/bin/python scripts/bench_latency.py --agents 1,10,50 --submissions 40
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from scire_schema import certs, files, tls
from scire_server import ca, store
from scire_server.store import Certificate

FINAL = {"succeeded", "failed", "timed_out", "lost", "denied", "expired", "cancelled", "mixed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    agents: int
    push: str
    poll_interval: float
    latencies: list[float]
    burst_jobs: int
    burst_seconds: float

    def row(self) -> str:
        q = statistics.quantiles(self.latencies, n=100)
        return (
            f"| {self.agents} | {self.push} | {self.poll_interval:g} s | {len(self.latencies)} | "
            f"{statistics.median(self.latencies) * 1000:.0f} ms | {q[98] * 1000:.0f} ms | "
            f"{self.burst_jobs} | {self.burst_seconds:.1f} s | "
            f"{self.burst_jobs / self.burst_seconds:.1f} |"
        )


class Bench:
    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.root = root
        self.bin = bin_dir
        self.port = free_port()
        self.state = root / "server"
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []

    def init(self) -> None:
        subprocess.run(
            [
                self.bin / "scire-admin",
                "init",
                "--state-dir",
                self.state,
                "--listen-port",
                str(self.port),
                "--bundle",
                self.root / "admin.pem",
            ],
            check=True,
            capture_output=True,
        )
        context = tls.client_context(
            self.state / "ca.pem", self.root / "admin.pem", self.root / "admin.pem"
        )
        self.admin = xmlrpc.client.ServerProxy(
            f"https://127.0.0.1:{self.port}/",
            transport=tls.TLSTransport(context, 30),
            allow_none=True,
        )

    def enroll(self, count: int) -> None:
        """``count`` more agents, accepted straight in the database."""
        db = store.Store(store.make_engine(f"sqlite:///{self.state / 'scire.db'}"), "bench")
        ca_key = certs.load_key((self.state / "ca.key").read_bytes())
        ca_cert = certs.load_cert((self.state / "ca.pem").read_bytes())
        for i in range(len(self.names), count):
            name = f"bench{i}"
            key = certs.generate_key()
            csr = certs.make_csr(key, name).decode()
            db.directory.register_client(
                name, csr, {}, None, key_fingerprint=certs.key_fingerprint(key)
            )
            cert = ca.sign_csr(ca_key, ca_cert, csr, name, ca.ROLE_CLIENT)
            pem = certs.cert_to_pem(cert).decode()
            db.directory.accept_client(
                name, Certificate(csr, pem, certs.fingerprint(cert)), "bench"
            )
            state = self.root / name
            state.mkdir(mode=0o700)
            files.write_private(state / "key.pem", certs.key_to_pem(key))
            files.write_public(state / "cert.pem", pem.encode())
            files.write_public(state / "csr.pem", csr.encode())
            files.write_public(state / "ca.pem", certs.cert_to_pem(ca_cert))
            self.names.append(name)
        db.close()

    def start_server(self, push: str, poll_interval: float) -> None:
        log = open(self.root / f"server-push-{push}.log", "ab")  # noqa: SIM115 - the process owns it
        # The server's poll interval is the fleet's: daemons take the one it suggests.
        ini = self.root / "server.ini"
        ini.write_text(f"[server]\npoll_interval = {int(poll_interval)}\n")
        self.server = subprocess.Popen(
            [
                self.bin / "scire-server",
                "--config",
                ini,
                "--state-dir",
                self.state,
                "--listen-port",
                str(self.port),
                "--push",
                push,
                "--log-level",
                "WARNING",
            ],
            stderr=log,
        )
        for _ in range(300):
            try:
                self.admin.admin.whoami()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("bench: the server did not start")

    def stop_server(self) -> None:
        assert self.server is not None
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(60)

    def start_agents(self, poll_interval: float) -> None:
        for name in self.names[len(self.agents) :]:
            log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
            self.agents.append(
                subprocess.Popen(
                    [
                        self.bin / "scire-client",
                        "--server",
                        f"https://127.0.0.1:{self.port}/",
                        "--state-dir",
                        self.root / name,
                        "--name",
                        name,
                        "--poll-interval",
                        str(poll_interval),
                        "--listen",
                        f"127.0.0.1:{free_port()}",
                        "daemon",
                    ],
                    stderr=log,
                )
            )

    def wait_present(self, count: int) -> None:
        """Until ``count`` agents have polled with their callback address."""
        for _ in range(600):
            daemons = [
                c
                for c in self.admin.admin.client_list()
                if c.get("agent_mode") == "daemon" and c.get("callback_address") and c["online"]
            ]
            if len(daemons) >= count:
                return
            time.sleep(0.2)
        raise SystemExit(f"bench: only {len(daemons)} of {count} agents came online")

    def stop_agents(self) -> None:
        for agent in self.agents:
            agent.send_signal(signal.SIGTERM)
        for agent in self.agents:
            agent.wait(60)

    def submit(self, hosts: list[str]) -> int:
        spec = {"script": "true", "name": "bench", "hosts": hosts, "timeout": 60}
        return int(self.admin.admin.job_submit(spec)["job_id"])

    def wait_final(self, job_id: int) -> None:
        while self.admin.admin.job_show(job_id)["state"] not in FINAL:
            time.sleep(0.01)

    def measure(self, agents: int, push: str, poll: float, count: int, burst: int) -> Result:
        latencies = []
        for i in range(count):
            start = time.perf_counter()
            job_id = self.submit([self.names[i % agents]])
            self.wait_final(job_id)
            latencies.append(time.perf_counter() - start)
        start = time.perf_counter()
        jobs = [self.submit(self.names[:agents]) for _ in range(burst)]
        for job_id in jobs:
            self.wait_final(job_id)
        return Result(agents, push, poll, latencies, burst * agents, time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="1,10,50", help="fleet sizes, comma-separated")
    p.add_argument("--submissions", type=int, default=40, help="latency samples per run")
    p.add_argument("--burst", type=int, default=5, help="jobs per agent in the burst")
    p.add_argument(
        "--poll-interval", type=int, default=10, help="the fleet's poll interval, seconds"
    )
    p.add_argument("--write", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = p.parse_args()
    sizes = sorted(int(n) for n in args.agents.split(","))
    bench = Bench(
        Path(tempfile.mkdtemp(prefix="scire-bench-latency-")), Path(sys.executable).parent
    )
    bench.init()
    results: list[Result] = []
    try:
        for size in sizes:
            bench.enroll(size)
            for push in ("on", "off"):
                bench.start_server(push, args.poll_interval)
                bench.start_agents(args.poll_interval)
                bench.wait_present(size)
                result = bench.measure(size, push, args.poll_interval, args.submissions, args.burst)
                results.append(result)
                print(result.row(), flush=True)
                bench.stop_server()
    finally:
        if bench.server is not None and bench.server.poll() is None:
            bench.stop_server()
        bench.stop_agents()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = "scripts/bench_latency.py " + shlex.join(sys.argv[1:])
    table = [
        "| agents | push | poll interval | samples | submit→done p50 | p99 | burst jobs | "
        "burst time | burst jobs/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(r.row() for r in results),
    ]
    print("\n".join(table))
    if args.write:
        doc = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
        with doc.open("a") as fh:
            fh.write(
                f"\n## Submit to done through daemon-mode agents, push on and off\n\n"
                f"`{command.strip()}` on {time.strftime('%Y-%m-%d')} ({machine}; server on "
                "SQLite, every agent a real `scire-client daemon` on localhost with a "
                "`poll_now` listener; the jobs run `true`).\n\n" + "\n".join(table) + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
