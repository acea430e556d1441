"""``scripts/pair``: up in one command, a job through it, a daemon killed and
the job after it served by the other, ``down`` that leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import _exe, wait_for

PAIR = Path(__file__).resolve().parents[2] / "scripts" / "pair"


def pair(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PAIR), *args], capture_output=True, text=True, timeout=timeout
    )


def admin(root: Path, *args: str, server: str | None = None) -> Any:
    where = ["--server", server] if server else []
    proc = subprocess.run(
        [_exe("scire-admin"), "-c", str(root / "admin.ini"), *where, "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def run_job(root: Path, host: str, text: str, server: str | None = None) -> str:
    job = admin(root, "job", "submit", "--host", host, "--command", f"echo {text}", server=server)
    done = admin(root, "job", "wait", str(job["job_id"]), "--timeout", "60", server=server)
    (assignment,) = done["assignments"]
    assert assignment["state"] == "succeeded", done
    return str(job["job_id"])


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory the postgres user can enter (pytest's own are private)."""
    top = Path(tempfile.mkdtemp(prefix="scire-pair-test-"))
    os.chmod(top, 0o755)
    yield top / "pair"
    shutil.rmtree(top, ignore_errors=True)


def test_pair_up_refuses_a_directory_postgres_cannot_enter(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        return  # run as another user, initdb runs as that user: nothing to refuse
    proc = pair("up", "--dir", str(tmp_path / "pair"))
    assert proc.returncode == 1 and "cannot enter" in proc.stderr, proc.stderr
    assert not (tmp_path / "pair").exists()


def test_pair_up_serves_survives_a_daemon_and_comes_down(root: Path) -> None:
    up = pair("up", "--dir", str(root), "--agents", "2", "--daemon-agents", "1")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((root / "pair.json").read_text())
        a, b = state["daemons"]["a"]["url"], state["daemons"]["b"]["url"]
        assert a in up.stdout and b in up.stdout and "job submit" in up.stdout
        # The database password is in the daemons' config files only.
        config = (root / "a" / "server.ini").read_text()
        password = config.split("scire:", 1)[1].split("@", 1)[0]
        assert password and password not in up.stdout + up.stderr
        assert (root / "a" / "server.ini").stat().st_mode & 0o077 == 0
        # Two certificates from one CA.
        assert (root / "a" / "ca.pem").read_bytes() == (root / "b" / "ca.pem").read_bytes()
        assert (root / "a" / "server.pem").read_bytes() != (root / "b" / "server.pem").read_bytes()
        servers = admin(root, "server", "list")
        assert sorted(s["instance_key"] for s in servers) == ["pair-a", "pair-b"], servers
        status = pair("status", "--dir", str(root))
        assert status.returncode == 0 and status.stdout.count("running") >= 3, status.stdout

        run_job(root, "pair-agent-1", "first")  # the daemon-mode agent
        # kill -9 of daemon a: the daemon-mode agent's next job comes through b.
        os.kill(state["daemons"]["a"]["pid"], signal.SIGKILL)
        wait_for(lambda: "dead" in pair("status", "--dir", str(root)).stdout, 30, "a to be dead")
        run_job(root, "pair-agent-1", "after-the-kill", server=b)
    finally:
        down = pair("down", "--dir", str(root))
    assert down.returncode == 0, down.stderr
    assert not root.exists()
    again = pair("down", "--dir", str(root))
    assert again.returncode == 1 and "no pair" in again.stderr
