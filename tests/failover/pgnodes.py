"""PostgreSQL servers the failover tests can hurt: started and stopped with
``pg_ctl`` (not under xprocess) so that a test can ``kill -9`` a postmaster,
restart it, or promote a standby.

``PgNode`` is one server on a localhost port; ``ReplicatedPair`` is a primary
with a synchronous streaming-replication standby made by
``pg_basebackup -R``. Both run as the ``postgres`` user when the tests run as
root (PostgreSQL refuses root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from conftest import _pg, free_port, wait_for


class PgNode:
    """One PostgreSQL server: its data directory under ``root``, its port."""

    def __init__(self, root: Path, name: str, as_postgres: list[str]) -> None:
        self.root = root
        self.name = name
        self.data = root / name
        self.log = root / f"{name}.log"
        self.port = free_port()
        self.as_postgres = as_postgres
        #: ``-c`` settings given at every start (not written into the data
        #: directory, so that a base backup does not inherit them).
        self.settings: dict[str, str] = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(root),
            "max_connections": "200",
            "fsync": "off",
        }

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.as_postgres, *args], capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc

    def initdb(self) -> None:
        self._run(_pg("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def basebackup_from(self, primary: PgNode) -> None:
        """This node as a streaming standby of ``primary`` (``-R`` writes
        ``standby.signal`` and ``primary_conninfo``)."""
        self._run(
            _pg("pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.data),
            "-R",
            "-X",
            "stream",
            "--no-sync",
            "--checkpoint=fast",
        )

    def start(self) -> None:
        options = " ".join(f"-c {key}={value}" for key, value in self.settings.items())
        self._run(
            _pg("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        if self.pid():
            self._run(_pg("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop at once (no checkpoint: crash recovery at start) and start again."""
        self.stop("immediate")
        self.start()

    def pid(self) -> int:
        """The postmaster's pid, 0 when it does not run."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return 0
        # A killed postmaster may linger as a zombie of whoever reaps it.
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return 0
        return 0 if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid

    def kill9(self) -> None:
        """``kill -9`` of the postmaster; its backends notice and exit."""
        pid = self.pid()
        assert pid, f"{self.name} does not run"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.accepts(), 30, f"{self.name} to go down")

    def promote(self) -> None:
        self._run(_pg("pg_ctl"), "-D", str(self.data), "-w", "promote")

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=3"

    def accepts(self) -> bool:
        try:
            with psycopg.connect(self.conninfo()):
                return True
        except psycopg.OperationalError:
            return False

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.conninfo(dbname), autocommit=True) as conn:
            cur = conn.execute(statement.encode())
            return list(cur.fetchall()) if cur.description else []


def _root() -> tuple[Path, list[str]]:
    for tool in ("initdb", "pg_ctl", "pg_basebackup"):
        assert Path(_pg(tool)).exists(), f"PostgreSQL is required for these tests: {tool}"
    root = Path(tempfile.mkdtemp(prefix="scire-pgpair-"))
    if os.geteuid() != 0:
        return root, []
    shutil.chown(root, "postgres", "postgres")
    return root, ["runuser", "-u", "postgres", "--"]


class SinglePg:
    """One throwaway PostgreSQL server and one database on it."""

    def __init__(self, database: str = "scire") -> None:
        self.root, as_postgres = _root()
        self.node = PgNode(self.root, "db", as_postgres)
        self.node.initdb()
        self.node.start()
        self.node.sql(f"CREATE DATABASE {database}")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.node.port}/{database}"

    def close(self) -> None:
        self.node.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class ReplicatedPair:
    """A primary and a synchronous standby on two localhost ports, and the
    multi-host URL that finds whichever of them accepts writes."""

    def __init__(self, database: str = "scire") -> None:
        self.root, as_postgres = _root()
        self.primary = PgNode(self.root, "primary", as_postgres)
        self.standby = PgNode(self.root, "standby", as_postgres)
        self.primary.initdb()
        self.primary.start()
        self.primary.sql(f"CREATE DATABASE {database}")
        self.standby.basebackup_from(self.primary)
        self.standby.start()
        # Synchronous commit waits for the standby's flush: an acknowledged
        # commit survives the primary. Set after the base backup, so that the
        # promoted standby does not wait for a standby it does not have.
        self.primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.primary.sql("ALTER SYSTEM SET synchronous_commit = 'on'")
        self.primary.sql("SELECT pg_reload_conf()")
        wait_for(self.synchronous, 60, "the standby to replicate synchronously")
        hosts = "&".join(f"host=127.0.0.1:{n.port}" for n in (self.primary, self.standby))
        self.url = (
            f"postgresql+psycopg://postgres@/{database}?{hosts}&target_session_attrs=read-write"
        )

    def synchronous(self) -> bool:
        return self.primary.sql("SELECT sync_state FROM pg_stat_replication") == [("sync",)]

    def fail_over(self) -> None:
        """``kill -9`` of the primary's postmaster, then promotion of the standby."""
        self.primary.kill9()
        self.standby.promote()

    def close(self) -> None:
        for node in (self.primary, self.standby):
            node.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
