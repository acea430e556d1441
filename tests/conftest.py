"""Shared fixtures: a real deployment (CA, server daemons, agents) on 127.0.0.1.

``deployment`` gives a fresh state directory, made by ``scire-admin init``;
servers run under pytest-xprocess; agents and ``scire-admin`` run as real
processes of the installed entry points. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from xprocess import ProcessStarter

BIN = Path(sys.executable).parent


def _exe(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name) or name


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SCIRE_"):
            monkeypatch.delenv(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class Deployment:
    """One Scire installation in a temporary directory."""

    def __init__(self, root: Path, xprocess: Any, database_url: str = "") -> None:
        self.root = root
        self.xprocess = xprocess
        self.port = free_port()
        self.state_dir = root / "server"
        self.bundle = root / "admin.pem"
        self.database_url = database_url
        self.url = f"https://127.0.0.1:{self.port}/"
        self.servers: dict[str, tuple[int, Path]] = {}
        self.ca_fingerprint = ""
        out = self.admin_offline(
            "init",
            "--state-dir",
            str(self.state_dir),
            "--listen-port",
            str(self.port),
            "--bundle",
            str(self.bundle),
            "--alt-name",
            "localhost",
            "--alt-name",
            "127.0.0.1",
            *(["--database-url", database_url] if database_url else []),
        )
        self.ca_fingerprint = out["ca_fingerprint"]

    # scire-admin

    def admin_offline(self, *args: str) -> Any:
        proc = subprocess.run(
            [_exe("scire-admin"), "--json", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def admin_run(
        self, *args: str, bundle: Path | None = None, url: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                _exe("scire-admin"),
                "--server",
                url or self.url,
                "--bundle",
                str(bundle or self.bundle),
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def admin(self, *args: str, bundle: Path | None = None) -> Any:
        """Run scire-admin; it must succeed; its JSON answer."""
        proc = self.admin_run(*args, bundle=bundle)
        assert proc.returncode == 0, f"scire-admin {' '.join(args)}: {proc.stderr}"
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def admin_fails(self, *args: str, bundle: Path | None = None) -> str:
        """Run scire-admin; it must fail; its error line."""
        proc = self.admin_run(*args, bundle=bundle)
        assert proc.returncode != 0, f"scire-admin {' '.join(args)} succeeded: {proc.stdout}"
        return proc.stderr

    def submit(self, *args: str, bundle: Path | None = None) -> int:
        return int(self.admin("job", "submit", *args, bundle=bundle)["job_id"])

    def job(self, job_id: int) -> Any:
        return self.admin("job", "show", str(job_id))

    def wait_job(self, job_id: int, timeout: float = 60) -> Any:
        """``job wait``; the job when every host is final, whether or not all succeeded
        (exit 0 or 5: the callers look at the states themselves)."""
        proc = self.admin_run("job", "wait", str(job_id), "--timeout", str(timeout))
        assert proc.returncode in (0, 5), f"scire-admin job wait {job_id}: {proc.stderr}"
        return json.loads(proc.stdout)

    def add_user(self, name: str, admin: bool = False) -> Path:
        path = self.root / f"{name}.pem"
        self.admin("user", "add", name, "--out", str(path), *(["--admin"] if admin else []))
        return path

    # scire-server

    def start_server(
        self,
        name: str = "server",
        *extra: str,
        port: int | None = None,
        instance_key: str | None = None,
    ) -> int:
        args = [
            _exe("scire-server"),
            "--state-dir",
            str(self.state_dir),
            "--listen-port",
            str(port or self.port),
            "--instance-key",
            instance_key or f"test-{self.port}",
            *(["--database-url", self.database_url] if self.database_url else []),
            *extra,
        ]

        class Starter(ProcessStarter):  # type: ignore[misc]
            pattern = "listening on"
            timeout = 60
            max_read_lines = 400
            terminate_on_interrupt = True

            @property
            def args(self) -> list[str]:
                return args

        key = f"{name}-{self.port}"
        if name not in self.servers:
            # xprocess keeps a log per key across runs, and a port (part of the
            # key) comes round again: this deployment's log starts empty.
            stale = Path(str(self.xprocess.getinfo(key).logpath))
            stale.unlink(missing_ok=True)
        pid, log = self.xprocess.ensure(key, Starter, restart=True)
        self.servers[name] = (pid, log)
        return int(pid)

    def server_log(self, name: str = "server") -> str:
        return Path(str(self.servers[name][1])).read_text(errors="replace")

    def stop_server(
        self, name: str = "server", sig: int = signal.SIGTERM, timeout: float = 30
    ) -> None:
        pid = self.servers[name][0]
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server {name} (pid {pid}) did not stop")

    # scire-client

    def agent_dir(self, name: str) -> Path:
        return self.root / "agents" / name

    def agent_args(
        self, name: str, *args: str, token: str | None = None, servers: Sequence[str] = ()
    ) -> list[str]:
        """``scire-client`` for agent ``name``, given ``servers`` (default this
        deployment's one URL) in failover order."""
        return [
            _exe("scire-client"),
            *[flag for url in servers or [self.url] for flag in ("--server", url)],
            "--state-dir",
            str(self.agent_dir(name)),
            "--name",
            name,
            "--ca-fingerprint",
            self.ca_fingerprint,
            *(["--token", token] if token else []),
            *args,
        ]

    def agent(
        self, name: str, *args: str, token: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.agent_args(name, *args, token=token),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def enroll(self, name: str) -> None:
        token = self.admin("client", "token")["token"]
        proc = self.agent(name, "enroll", token=token)
        assert proc.returncode == 0, proc.stderr

    def run_agent(self, name: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = self.agent(name, "run", timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        return proc


@pytest.fixture
def deployment(tmp_path: Path, xprocess: Any) -> Iterator[Deployment]:
    dep = Deployment(tmp_path, xprocess)
    try:
        yield dep
    finally:
        for name in list(dep.servers):
            try:
                dep.stop_server(name)
            except AssertionError:
                dep.stop_server(name, signal.SIGKILL)


@pytest.fixture
def running(deployment: Deployment) -> Deployment:
    """A deployment whose server is up."""
    deployment.start_server()
    return deployment


# --- PostgreSQL -------------------------------------------------------------------


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as the ``postgres`` user
    when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self, xprocess: Any) -> None:
        for tool in ("initdb", "postgres"):
            if not Path(_pg(tool)).exists():
                pytest.fail(f"PostgreSQL is required for these tests: {tool} not found")
        self.root = Path(tempfile.mkdtemp(prefix="scire-pg-"))
        self.port = free_port()
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        data = self.root / "data"
        subprocess.run(
            [
                *self.as_postgres,
                _pg("initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        args = [
            *self.as_postgres,
            _pg("postgres"),
            "-D",
            str(data),
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]

        class Starter(ProcessStarter):  # type: ignore[misc]
            pattern = "database system is ready to accept connections"
            timeout = 60
            terminate_on_interrupt = True

            @property
            def args(self) -> list[str]:
                return args

        self.name = f"postgres-{self.port}"
        self._starter = Starter
        xprocess.ensure(self.name, Starter, restart=True)
        self.xprocess = xprocess
        self._count = 0

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        self._count += 1
        name = f"scire_test_{self._count}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.xprocess.getinfo(self.name).terminate()
        shutil.rmtree(self.root, ignore_errors=True)

    def stop_server(self) -> None:
        """Stop the PostgreSQL server, keeping its data (an outage)."""
        self.xprocess.getinfo(self.name).terminate()

    def start_server(self) -> None:
        """Start the server :meth:`stop_server` stopped, on the same port and data."""
        self.xprocess.ensure(self.name, self._starter, restart=True)

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}", autocommit=True
        ) as conn:
            conn.execute(statement)


def _pg(tool: str) -> str:
    """The PostgreSQL binary on PATH, else the newest under Debian's /usr/lib/postgresql."""
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3])
    )
    return str(candidates[-1]) if candidates else tool


@pytest.fixture(scope="session")
def postgres(xprocess: Any) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(xprocess)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    return postgres.new_database()
