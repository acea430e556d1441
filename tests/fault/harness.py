"""A reusable fault harness: one server, several real agents, marker jobs, and
the checks that nothing was lost and nothing ran twice.

Every job the harness submits appends its id to a per-host file when it
runs: the script's working directory is the job's ``work/`` in its tree under
the agent's default ``work_root`` (``state_dir/work/<job_id>/work/``), so
``../../../ran.log`` is ``agents/<host>/ran.log``. At the end
``FaultRig.check`` compares those files with the ``assignments`` and
``events`` tables of the database: the SQLite file, or the PostgreSQL
database of ``Deployment.database_url`` (read with psycopg; the queries are
written with ``?`` placeholders for both).

A rig runs one server daemon or several (``start_server(name=..., port=...)``,
each with its own port and instance key, all on the deployment's state
directory and database); agents are given every daemon's URL in start order.
Agents run ``scire-client run`` once per call (normal mode), or as
``scire-client daemon`` processes (the hosts in ``daemon_hosts``: a short
poll interval and a poll_now listener, so pushes reach them).

Faults are injected with plain signals (``kill -9`` of a server or of an
agent, SIGTERM of a server), with an agent impersonated over XML-RPC
(``ManualAgent``: it polls with the agent's own certificate and never
acknowledges), or by editing the database.
"""

from __future__ import annotations

import collections
import configparser
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
import xmlrpc.client
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import Deployment, free_port, wait_for

from scire_schema import tls

#: The marker: one line with the job id, appended when the job runs.
MARK = 'echo "$SCIRE_JOB_ID" >> ../../../ran.log'
RAN_LOG = "ran.log"
STARTS_LOG = "starts.log"
FINAL = frozenset({"succeeded", "failed", "timed_out", "denied", "expired", "cancelled"})
#: Agent settings that keep fault tests short: quick heartbeats, and a run that
#: gives up on an unreachable server after a second or two.
FAST_AGENT = {
    "heartbeat_interval": "0.5",
    "report_retry_for": "1.5",
    "connect_timeout": "3",
    "kill_grace": "1",
}
#: What daemon-mode agents get on top: a quick poll (the lowest allowed) and a
#: listener, so that a submission pushes them.
FAST_DAEMON = {"poll_interval": "1", "poll_jitter": "0.3", "max_parallel": "10"}
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.S)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def libpq_conninfo(url: str) -> str:
    """The libpq connection string of a SQLAlchemy PostgreSQL URL, the
    multi-host form (``?host=H1:P1&host=H2:P2``) included."""
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    query = dict(parsed.query)
    raw_hosts = query.pop("host", ())
    hosts = [raw_hosts] if isinstance(raw_hosts, str) else list(raw_hosts)
    if hosts:
        pairs = [h.rpartition(":") if ":" in h else (h, "", "5432") for h in hosts]
        host, port = ",".join(p[0] for p in pairs), ",".join(p[2] for p in pairs)
    else:
        host, port = parsed.host or "127.0.0.1", str(parsed.port or 5432)
    words = {"host": host, "port": port, "dbname": parsed.database or "", "connect_timeout": "5"}
    words["user"] = parsed.username or "postgres"
    if parsed.password:
        words["password"] = parsed.password
    words.update({k: v if isinstance(v, str) else v[-1] for k, v in query.items()})
    return " ".join(f"{k}={v}" for k, v in words.items())


@dataclass
class Daemon:
    """A server daemon of the rig: how to start it again."""

    port: int
    instance_key: str
    extra: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"


def _proxy(url: str, context: Any, timeout: float = 30) -> Any:
    class Transport(xmlrpc.client.SafeTransport):
        def make_connection(self, host: Any) -> Any:
            conn = super().make_connection(host)
            conn.timeout = timeout
            return conn

    return xmlrpc.client.ServerProxy(url, transport=Transport(context=context), allow_none=True)


class ManualAgent:
    """Talks to the server as agent ``host`` (its own certificate), by hand."""

    def __init__(self, dep: Deployment, host: str) -> None:
        state = dep.agent_dir(host)
        context = tls.client_context(state / "ca.pem", state / "cert.pem", state / "key.pem")
        self.proxy = _proxy(dep.url, context)

    def poll(
        self, held: Sequence[int] = (), running: Sequence[int] = (), limit: int = 10
    ) -> dict[str, Any]:
        return dict(self.proxy.agent.poll(list(held), list(running), limit))

    def acknowledge(self, pairs: Iterable[tuple[int, str]]) -> list[int]:
        payload = [{"job_id": j, "delivery_id": d} for j, d in pairs]
        return list(self.proxy.agent.acknowledge(payload)["acknowledged"])

    def close(self) -> None:
        self.proxy("close")()

    def __enter__(self) -> ManualAgent:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class Tally:
    """What ``FaultRig.check`` found."""

    jobs: int = 0
    assignments: int = 0
    runs: int = 0
    lost: int = 0
    duplicates: int = 0
    states: collections.Counter[str] = field(default_factory=collections.Counter)

    def line(self, kills: int) -> str:
        states = ", ".join(f"{k}={v}" for k, v in sorted(self.states.items()))
        return (
            f"fault summary: jobs={self.jobs} assignments={self.assignments} runs={self.runs} "
            f"kills={kills} lost={self.lost} duplicates={self.duplicates} ({states})"
        )


class FaultRig:
    """A deployment with ``hosts`` enrolled agents, and the means to hurt it."""

    def __init__(
        self,
        dep: Deployment,
        hosts: Sequence[str],
        agent_settings: dict[str, str] | None = None,
        *,
        daemon_hosts: Sequence[str] = (),
        daemon_settings: dict[str, str] | None = None,
    ) -> None:
        self.dep = dep
        self.hosts = list(hosts)
        self.settings = {**FAST_AGENT, **(agent_settings or {})}
        self.daemon_hosts = list(daemon_hosts)  #: agents run as ``scire-client daemon``
        self.daemon_settings = {**FAST_DAEMON, **(daemon_settings or {})}
        self.kills = 0  #: SIGKILLs dealt, to servers and agents
        self.daemons: dict[str, Daemon] = {}  #: server daemons by name, in start order
        self.agent_daemons: dict[str, subprocess.Popen[str]] = {}
        self._admin: Any = None
        self._admin_url = ""
        self._loops: list[threading.Thread] = []
        self._stop_loops = threading.Event()

    @property
    def extra(self) -> tuple[str, ...]:
        """The first server's extra options."""
        return next(iter(self.daemons.values())).extra if self.daemons else ()

    @property
    def urls(self) -> list[str]:
        """Every daemon's URL in start order: the agents' failover list."""
        return [d.url for d in self.daemons.values()] or [self.dep.url]

    @property
    def postgres(self) -> bool:
        return self.dep.database_url.startswith("postgresql")

    # --- set-up -------------------------------------------------------------

    def start_server(self, *extra: str, name: str = "server", port: int | None = None) -> int:
        """Start a server daemon under xprocess with ``extra`` options; its pid.
        The first one listens on the deployment's port; another gets a port
        of its own (or ``port``) and an instance key of its own."""
        if name in self.daemons:
            raise AssertionError(f"daemon {name} started already: restart_server() it")
        first = not self.daemons
        port = port or (self.dep.port if first else free_port())
        key = f"test-{self.dep.port}" if first else f"test-{name}-{port}"
        self.daemons[name] = Daemon(port, key, tuple(extra))
        return self.dep.start_server(name, *extra, port=port, instance_key=key)

    def enroll_all(self) -> None:
        token = self.dep.admin("client", "token", "--uses", str(len(self.hosts)))["token"]
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            procs = list(pool.map(lambda h: self.dep.agent(h, "enroll", token=token), self.hosts))
        for host, proc in zip(self.hosts, procs, strict=True):
            assert proc.returncode == 0, f"enroll {host}: {proc.stderr}"
            self.config_file(host)

    def config_file(self, host: str) -> Path:
        path = self.dep.agent_dir(host) / "client.ini"
        if not path.exists():
            parser = configparser.ConfigParser()
            parser["client"] = dict(self.settings)
            if host in self.daemon_hosts:
                parser["client"].update(self.daemon_settings)
                parser["client"]["listen"] = f"127.0.0.1:{free_port()}"
            with open(path, "w", encoding="utf-8") as fh:
                parser.write(fh)
        return path

    # --- the admin API, in-process (a scire-admin process costs ~1 s) -------

    def admin(self) -> Any:
        """The admin API of the first daemon that runs."""
        if self._admin is None:
            text = self.dep.bundle.read_text(encoding="utf-8")
            certs = [m.group(0) for m in _PEM_BLOCK.finditer(text) if m.group(1) == "CERTIFICATE"]
            context = tls.client_context(None, self.dep.bundle, self.dep.bundle, ca_data=certs[-1])
            live = [d.url for n, d in self.daemons.items() if self.server_running(n)]
            self._admin_url = (live or self.urls)[0]
            self._admin = _proxy(self._admin_url, context)
        return self._admin

    def reset_admin(self) -> None:
        """Forget the admin connection (after a server restart)."""
        if self._admin is not None:
            try:
                self._admin("close")()
            except OSError:
                pass
        self._admin = None

    def submit(self, hosts: Sequence[str], script: str = MARK, **spec: Any) -> int:
        answer = self.admin().admin.job_submit(
            {"name": spec.pop("name", "fault"), "script": script, "hosts": list(hosts), **spec}
        )
        assert not answer["refused"], answer
        return int(answer["job_id"])

    def submit_many(self, count: int, hosts: Sequence[str] | None = None, **spec: Any) -> list[int]:
        """``count`` marker jobs, each for every host in ``hosts`` (default all)."""
        return [self.submit(hosts or self.hosts, name=f"fault-{i}", **spec) for i in range(count)]

    def cancel(self, job_id: int) -> int:
        return int(self.admin().admin.job_cancel(job_id)["cancelled"])

    # --- agents ------------------------------------------------------------

    def agent_cmd(self, host: str, command: str = "run") -> list[str]:
        config = str(self.config_file(host))
        return self.dep.agent_args(host, "-c", config, command, servers=self.urls)

    def start_agent_daemons(self, hosts: Sequence[str] | None = None) -> None:
        """``scire-client daemon`` for each of ``hosts`` (default every one of
        ``daemon_hosts``), logging to agent.log; they run until ``stop_agents``."""
        marks: dict[str, int] = {}
        for host in hosts or self.daemon_hosts:
            assert host in self.daemon_hosts, f"{host} is not a daemon-mode agent"
            log_path = self.dep.agent_dir(host) / "agent.log"
            marks[host] = log_path.stat().st_size if log_path.exists() else 0
            cmd = self.agent_cmd(host, "daemon")
            with open(log_path, "a", encoding="utf-8") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
            self.agent_daemons[host] = proc

        def started() -> bool:
            for host, mark in marks.items():
                with open(self.dep.agent_dir(host) / "agent.log", "rb") as fh:
                    fh.seek(mark)
                    if b"daemon started" not in fh.read():
                        return False
            return True

        wait_for(started, 60, f"the daemons of {', '.join(marks)} to start")

    def start_agents(self, pause: float = 0.5) -> None:
        """Every agent at work until ``stop_agents``: the daemon-mode ones as
        daemons, each normal-mode one as ``scire-client run`` again and again
        (``pause`` seconds apart), the way cron runs it."""
        self._stop_loops.clear()

        def loop(host: str) -> None:
            while not self._stop_loops.is_set():
                self.run_agent(host, timeout=120)
                self._stop_loops.wait(pause)

        for host in self.hosts:
            if host not in self.daemon_hosts:
                thread = threading.Thread(target=loop, args=(host,), name=f"agent-{host}")
                thread.start()
                self._loops.append(thread)
        self.start_agent_daemons()

    def stop_agents(self) -> None:
        """Stop the normal-mode loops (each finishes its run) and the daemons (SIGTERM)."""
        self._stop_loops.set()
        for proc in self.agent_daemons.values():
            if proc.poll() is None:
                proc.terminate()
        for thread in self._loops:
            thread.join(180)
        self._loops.clear()
        for host, proc in self.agent_daemons.items():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"the daemon of {host} did not stop on SIGTERM") from None
        self.agent_daemons.clear()

    def spawn_agent(self, host: str) -> subprocess.Popen[str]:
        """Start ``scire-client run`` for ``host``; its output goes to agent.log."""
        with open(self.dep.agent_dir(host) / "agent.log", "a", encoding="utf-8") as log:
            return subprocess.Popen(
                self.agent_cmd(host), stdout=log, stderr=subprocess.STDOUT, text=True
            )

    def run_agent(self, host: str, timeout: float = 60) -> int:
        """One ``scire-client run``; its exit status (its log goes to agent.log)."""
        proc = self.spawn_agent(host)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    def run_agents(self, hosts: Sequence[str] | None = None, timeout: float = 60) -> dict[str, int]:
        """Every agent once, in parallel; their exit statuses."""
        hosts = list(hosts or self.hosts)
        with ThreadPoolExecutor(len(hosts)) as pool:
            codes = list(pool.map(lambda h: self.run_agent(h, timeout), hosts))
        return dict(zip(hosts, codes, strict=True))

    def kill_agent(self, proc: subprocess.Popen[str]) -> int:
        """SIGKILL a running agent (its jobs' process groups live on); its status."""
        proc.kill()
        self.kills += 1
        return proc.wait(30)

    def agent_log(self, host: str) -> str:
        path = self.dep.agent_dir(host) / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spool_file(self, host: str, job_id: int, name: str) -> str:
        return (self.dep.agent_dir(host) / "spool" / str(job_id) / name).read_text("utf-8")

    def journal(self, host: str, job_id: int) -> dict[str, Any]:
        """The agent's journal (``state`` JSON) of one spooled job."""
        return dict(json.loads(self.spool_file(host, job_id, "state")))

    # --- the server --------------------------------------------------------

    def server_running(self, name: str = "server") -> bool:
        try:
            return self.server_popen(name).poll() is None
        except (AssertionError, KeyError):
            return False

    def server_popen(self, name: str = "server") -> subprocess.Popen[bytes]:
        """The Popen of the running server (xprocess keeps it), for its exit status."""
        pid = self.dep.servers[name][0]
        for resource in reversed(self.dep.xprocess.resources):
            if resource.popen is not None and resource.popen.pid == pid:
                return resource.popen  # type: ignore[no-any-return]
        raise AssertionError(f"no process for server {name} (pid {pid})")

    def kill_server(self, name: str = "server", sig: int = signal.SIGKILL) -> int:
        """Signal the server and wait for it; its exit status (negative: the signal)."""
        popen = self.server_popen(name)
        popen.send_signal(sig)
        code = popen.wait(30)
        if sig == signal.SIGKILL:
            self.kills += 1
        self.reset_admin()
        return code

    def server_log(self, name: str = "server") -> str:
        return Path(str(self.dep.servers[name][1])).read_text(errors="replace")

    def close(self) -> None:
        """Stop the agents, then every server still running, reaping it through its Popen."""
        self.stop_agents()
        self.reset_admin()
        for name in list(self.dep.servers):
            try:
                popen = self.server_popen(name)
            except AssertionError:
                continue
            if popen.poll() is None:
                popen.terminate()
                try:
                    popen.wait(30)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()

    def restart_server(self, name: str = "server") -> float:
        """Start the server again with the same options; seconds it took."""
        start = time.monotonic()
        daemon = self.daemons[name]
        self.dep.start_server(
            name, *daemon.extra, port=daemon.port, instance_key=daemon.instance_key
        )
        self.reset_admin()
        return time.monotonic() - start

    # --- the evidence --------------------------------------------------------

    def lines(self, host: str, log: str = RAN_LOG) -> list[int]:
        path = self.dep.agent_dir(host) / log
        if not path.exists():
            return []
        return [int(x) for x in path.read_text().split()]

    def total_lines(self, log: str = RAN_LOG) -> int:
        return sum(len(self.lines(h, log)) for h in self.hosts)

    def wait_lines(self, count: float, timeout: float = 90) -> None:
        """Wait until the hosts' ``ran.log`` files hold ``count`` lines in all."""
        wait_for(lambda: self.total_lines() >= count, timeout, f"{count:.0f} jobs to run")

    def forget_runs(self) -> None:
        """Empty the hosts' run logs (between tests sharing one rig, after a check)."""
        for host in self.hosts:
            (self.dep.agent_dir(host) / RAN_LOG).unlink(missing_ok=True)

    def db(self) -> Any:
        """A connection to the deployment's database, rows by column name."""
        if self.postgres:
            import psycopg
            from psycopg.rows import dict_row

            return psycopg.connect(libpq_conninfo(self.dep.database_url), row_factory=dict_row)
        conn = sqlite3.connect(self.dep.state_dir / "scire.db", timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def query(self, sql: str, *params: Any) -> list[Any]:
        conn = self.db()
        try:
            return list(conn.execute(self._sql(sql), params).fetchall())
        finally:
            conn.close()

    def execute(self, sql: str, *params: Any) -> int:
        conn = self.db()
        try:
            with conn:
                return int(conn.execute(self._sql(sql), params).rowcount)
        finally:
            conn.close()

    def assignment(self, job_id: int, host: str) -> Any:
        (row,) = self.query(
            "SELECT a.* FROM assignments a JOIN clients c ON c.id = a.client_id "
            "WHERE a.job_id = ? AND c.name = ?",
            job_id,
            host,
        )
        return row

    def events(self, job_id: int, action: str | None = None) -> list[Any]:
        sql = "SELECT * FROM events WHERE job_id = ?"
        args: list[Any] = [job_id]
        if action:
            sql += " AND action = ?"
            args.append(action)
        return self.query(sql + " ORDER BY id", *args)

    def all_final(self, job_ids: Sequence[int]) -> bool:
        marks = ",".join("?" * len(job_ids))
        rows = self.query(f"SELECT state FROM assignments WHERE job_id IN ({marks})", *job_ids)
        return all(r["state"] in FINAL for r in rows)

    def run_until_done(self, job_ids: Sequence[int], rounds: int = 6) -> int:
        """Run every agent until all of ``job_ids`` are final; rounds used."""
        for n in range(1, rounds + 1):
            codes = self.run_agents()
            if self.all_final(job_ids) and all(c == 0 for c in codes.values()):
                return n
        raise AssertionError(f"jobs not final after {rounds} rounds: {self.states(job_ids)}")

    def states(self, job_ids: Sequence[int]) -> collections.Counter[str]:
        marks = ",".join("?" * len(job_ids))
        rows = self.query(f"SELECT state FROM assignments WHERE job_id IN ({marks})", *job_ids)
        return collections.Counter(r["state"] for r in rows)

    def check(self, job_ids: Sequence[int], *, one_final_event: bool = True) -> Tally:
        """Every assignment of ``job_ids`` is final; a succeeded one ran exactly
        once on its host, any other at most once; no job ran that was not
        submitted here; with ``one_final_event`` the audit shows exactly one
        transition into a final state per assignment."""
        wanted = set(job_ids)
        marks = ",".join("?" * len(job_ids))
        rows = self.query(
            "SELECT a.job_id, c.name AS host, a.state FROM assignments a "
            f"JOIN clients c ON c.id = a.client_id WHERE a.job_id IN ({marks})",
            *job_ids,
        )
        tally = Tally(jobs=len(wanted), assignments=len(rows))
        ran = {h: collections.Counter(self.lines(h)) for h in self.hosts}
        problems: list[str] = []
        for host, counts in ran.items():
            strangers = sorted(set(counts) - wanted)
            if strangers:
                problems.append(f"{host} ran jobs never submitted here: {strangers}")
            for job_id, n in counts.items():
                tally.runs += n
                if n > 1:
                    tally.duplicates += n - 1
                    problems.append(f"job {job_id} ran {n} times on {host}")
        finals = collections.Counter(
            (r["job_id"], r["client"])
            for r in self.query(
                f"SELECT job_id, client FROM events WHERE job_id IN ({marks}) AND new_state IN "
                f"({','.join('?' * len(FINAL))})",
                *job_ids,
                *sorted(FINAL),
            )
        )
        for row in rows:
            job_id, host, state = row["job_id"], row["host"], row["state"]
            tally.states[state] += 1
            n = ran.get(host, collections.Counter())[job_id]
            if state not in FINAL:
                tally.lost += 1
                problems.append(f"job {job_id} on {host} is still {state}")
            elif state == "succeeded" and n == 0:
                tally.lost += 1
                problems.append(f"job {job_id} on {host} succeeded but never ran")
            if one_final_event and state in FINAL and finals[(job_id, host)] != 1:
                problems.append(
                    f"job {job_id} on {host}: {finals[(job_id, host)]} final transitions"
                )
        assert not problems, "\n".join(problems)
        return tally
