#!/usr/bin/env python3
"""Failover drill with real processes: how long the pair is without service,
and whether anything is lost or run twice.

Stands a pair up with ``scripts/pair up --replicated`` (PostgreSQL primary and
synchronous standby, two daemons on the multi-host URL, A daemon-mode agents
with both URLs), then, with LOAD marker jobs for every agent in flight:

* daemon drill (ROUNDS times): ``kill -9`` of daemon a with the load in
  flight (b finishes it; lost and twice counted); a started again; then
  ``kill -9`` of b, which the agents moved to, and a probe job submitted
  through a at once; measured: kill -> the probe's first assignment
  ``succeeded`` (an agent moved back to a, ran it, reported). b is started
  again before the next round.
* database drill (once): ``kill -9`` of the primary's postmaster with the
  load in flight, then ``pg_ctl promote`` of the standby; measured: kill ->
  the first assignment that succeeds after it (a success is a commit, so it
  needs the new primary), and kill -> promotion done.

After each drill every assignment must be final; ``lost`` counts assignments
not final or succeeded without a run, ``twice`` runs beyond one per
assignment (from the agents' run logs). ``--write`` appends the table to
docs/BENCHMARKS.md.

    .venv/bin/python scripts/bench_failover.py --agents 6 --load 20 --rounds 3 --write
"""

from __future__ import annotations

import argparse
import collections
import importlib.machinery
import importlib.util
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from types import ModuleType
from typing import Any

from scire_schema import tls

REPO = Path(__file__).resolve().parent.parent
FINAL = {"succeeded", "failed", "timed_out", "denied", "expired", "cancelled"}
MARK = 'echo "$SCIRE_JOB_ID" >> ../../../ran.log'


def load_pair() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("pair", str(REPO / "scripts" / "pair"))
    spec = importlib.util.spec_from_loader("pair", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Drill:
    def __init__(self, pair: ModuleType, root: Path, agents: int) -> None:
        self.pair = pair
        self.root = root
        self.state = pair.up(root, agents, agents, replicated=True)
        self.hosts = list(self.state["agents"])
        bundle = Path(self.state["admin_bundle"])
        self.context = tls.client_context(root / "a" / "ca.pem", bundle, bundle)

    def admin(self, daemon: str) -> Any:
        url = self.state["daemons"][daemon]["url"]
        return xmlrpc.client.ServerProxy(url, transport=tls.TLSTransport(self.context, 10))

    def submit(self, daemon: str, name: str, deadline: float = 120) -> int:
        """A marker job for every agent through ``daemon``, retried while it
        cannot take it (the database away); its id."""
        stop = time.monotonic() + deadline
        while True:
            try:
                spec = {"name": name, "script": MARK, "hosts": self.hosts, "max_attempts": 10}
                return int(self.admin(daemon).admin.job_submit(spec)["job_id"])
            except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
                if time.monotonic() > stop:
                    raise
                time.sleep(0.05)

    def states(self, daemon: str, job_id: int) -> list[str]:
        try:
            detail = self.admin(daemon).admin.job_show(job_id)
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
            return []
        return [a["state"] for a in detail["assignments"]]

    def wait(self, daemon: str, job_ids: list[int], timeout: float = 300) -> None:
        stop = time.monotonic() + timeout
        for job_id in job_ids:
            while not (s := self.states(daemon, job_id)) or not set(s) <= FINAL:
                if time.monotonic() > stop:
                    raise SystemExit(f"job {job_id} not final after {timeout:g} s: {s}")
                time.sleep(0.1)

    def first_success(self, daemon: str, job_id: int, start: float) -> float:
        while "succeeded" not in self.states(daemon, job_id):
            if time.monotonic() - start > 300:
                raise SystemExit(f"probe {job_id} did not succeed within 300 s")
            time.sleep(0.01)
        return time.monotonic() - start

    def runs(self) -> collections.Counter[int]:
        counts: collections.Counter[int] = collections.Counter()
        for host in self.hosts:
            log = self.root / "agents" / host / "ran.log"
            if log.exists():
                counts.update(int(x) for x in log.read_text().split())
        return counts

    def tally(self, daemon: str, job_ids: list[int]) -> tuple[int, int]:
        """(lost, twice) over ``job_ids`` for every host."""
        runs = self.runs()
        lost = twice = 0
        for job_id in job_ids:
            states = self.states(daemon, job_id)
            ran = runs[job_id]
            succeeded = states.count("succeeded")
            lost += sum(1 for s in states if s not in FINAL) + max(succeeded - ran, 0)
            twice += max(ran - len(states), 0)
        return lost, twice

    def load(self, daemon: str, count: int, tag: str) -> list[int]:
        return [self.submit(daemon, f"{tag}-{i}") for i in range(count)]

    def restart_daemon(self, name: str) -> None:
        daemon = self.state["daemons"][name]
        config = self.root / name / "server.ini"
        log = Path(daemon["log"])
        mark = len(log.read_text(errors="replace"))
        daemon["pid"] = self.pair.background(
            [str(REPO / ".venv" / "bin" / "scire-server"), "-c", str(config)], log
        )
        # scripts/pair down stops the pids on record: record the new one.
        (self.root / self.pair.STATE).write_text(json.dumps(self.state, indent=2))
        stop = time.monotonic() + 90
        while "listening on" not in log.read_text(errors="replace")[mark:]:
            if time.monotonic() > stop:
                raise SystemExit(f"daemon {name} did not start again: see {log}")
            time.sleep(0.05)

    def daemon_round(self, load: int, n: int) -> tuple[float, int, int]:
        """Two kills. First the daemon the agents use, with LOAD jobs in
        flight: the other finishes them (lost, twice). Then, idle, the daemon
        they moved to: a probe through the restarted first one, timed from
        the kill to its first success (no queue of load jobs in front of it)."""
        victim, other = "a", "b"
        jobs = self.load(victim, load, f"daemon-{n}")
        time.sleep(0.5)  # some of the load taken by the agents, some not yet
        os.kill(self.state["daemons"][victim]["pid"], signal.SIGKILL)
        self.wait(other, jobs)
        lost, twice = self.tally(other, jobs)
        self.restart_daemon(victim)
        os.kill(self.state["daemons"][other]["pid"], signal.SIGKILL)
        start = time.monotonic()
        probe = self.submit(victim, f"probe-daemon-{n}")
        served = self.first_success(victim, probe, start)
        self.wait(victim, [probe])
        probe_lost, probe_twice = self.tally(victim, [probe])
        self.restart_daemon(other)
        return served, lost + probe_lost, twice + probe_twice

    def succeeded(self, daemon: str, job_ids: list[int]) -> int:
        return sum(self.states(daemon, j).count("succeeded") for j in job_ids)

    def database_round(self, load: int) -> tuple[float, float, int, int]:
        """``kill -9`` of the primary with the load in flight, promotion of the
        standby; timed from the kill to the first assignment that succeeds
        after it (every success needs a commit, so the new primary)."""
        jobs = self.load("a", load, "database")
        time.sleep(0.5)
        before = self.succeeded("a", jobs)
        pg = self.root / "pg"
        primary_pid = int((pg / "primary" / "postmaster.pid").read_text().split()[0])
        os.kill(primary_pid, signal.SIGKILL)
        start = time.monotonic()
        promote = [self.pair._pg("pg_ctl"), "-D", str(pg / "standby"), "-w", "promote"]
        self.pair.run([*self.pair.as_postgres(), *promote], "pg_ctl promote")
        promoted = time.monotonic() - start
        while self.succeeded("a", jobs) <= before:
            if time.monotonic() - start > 300:
                raise SystemExit("no job succeeded within 300 s of the primary's kill")
            time.sleep(0.01)
        served = time.monotonic() - start
        self.wait("a", jobs)
        lost, twice = self.tally("a", jobs)
        return promoted, served, lost, twice

    def close(self) -> None:
        self.pair.down(self.root, quiet=True)


def machine() -> str:
    load = os.getloadavg()[1]  # the machine may be shared: its 5-minute load at the end
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load {load:.1f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=6, help="daemon-mode agents (default 6)")
    p.add_argument("--load", type=int, default=20, help="jobs in flight per drill (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="daemon drills (default 3)")
    p.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = p.parse_args()
    top = Path(tempfile.mkdtemp(prefix="scire-drill-"))
    os.chmod(top, 0o755)  # the postgres user reaches the database below it
    root = top / "pair"
    drill = Drill(load_pair(), root, args.agents)
    try:
        daemon = [drill.daemon_round(args.load, n) for n in range(args.rounds)]
        promoted, db_served, db_lost, db_twice = drill.database_round(args.load)
    finally:
        drill.close()
        top.rmdir()
    served = [d[0] for d in daemon]
    assignments = args.load * args.agents
    rows = [
        "| date | drill | agents | assignments per drill | kill -> first job served "
        "| jobs lost | run twice | machine |",
        "|---|---|---|---|---|---|---|---|",
        f"| {time.strftime('%Y-%m-%d')} | kill -9 of a daemon ({args.rounds}x) | {args.agents} "
        f"| {assignments} | median {statistics.median(served):.2f} s, max {max(served):.2f} s "
        f"| {sum(d[1] for d in daemon)} | {sum(d[2] for d in daemon)} | {machine()} |",
        f"| {time.strftime('%Y-%m-%d')} | kill -9 of the primary + promotion "
        f"(promoted after {promoted:.2f} s) | {args.agents} | {assignments} | {db_served:.2f} s "
        f"| {db_lost} | {db_twice} | {machine()} |",
    ]
    table = "\n".join(rows)
    print(table)
    if args.write:
        command = shlex.join([".venv/bin/python", "scripts/bench_failover.py", *sys.argv[1:]])
        command = command.replace(" --write", "")
        section = (
            "\n## Failover drill (issue 9)\n\n"
            "`scripts/bench_failover.py`: `scripts/pair up --replicated` (PostgreSQL primary and "
            "synchronous standby, two daemons on the multi-host URL, daemon-mode agents with "
            "both URLs), marker jobs for every agent in flight, then `kill -9` of the daemon the "
            "agents use (the other finishes the load), and `kill -9` of the other, idle, with a "
            "probe submitted through the first at once (timed from the kill to the probe's "
            "first success); and `kill -9` of the primary's postmaster with the load in flight "
            "and `pg_ctl promote` of the standby (timed from the kill to the first assignment "
            "that succeeds after it); "
            "lost and twice from the final states and the agents' run logs.\n\n"
            f"{table}\n\nCommand: `{command} --write`\n"
        )
        with open(REPO / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
            fh.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
