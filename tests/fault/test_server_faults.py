"""Faults on the server's side: a second daemon with the same instance key, and
a graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest
from conftest import BIN, Deployment, free_port
from harness import FaultRig

HOST = "host1"


@pytest.fixture
def rig(deployment: Deployment) -> Iterator[FaultRig]:
    rig = FaultRig(deployment, [HOST])
    yield rig
    rig.close()


def _server_row(rig: FaultRig) -> dict[str, object]:
    (row,) = rig.query("SELECT * FROM servers")
    return dict(row)


def test_second_instance_with_the_same_key_is_refused(rig: FaultRig) -> None:
    first = rig.start_server()
    rig.enroll_all()
    key = f"test-{rig.dep.port}"
    proc = subprocess.run(
        [
            str(BIN / "scire-server"),
            "--state-dir",
            str(rig.dep.state_dir),
            "--listen-port",
            str(free_port()),
            "--instance-key",
            key,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    refusal = [line for line in proc.stderr.splitlines() if "refusing to start" in line]
    assert refusal and repr(key) in refusal[0] and f"pid {first}" in refusal[0], proc.stderr
    assert "listening on" not in proc.stderr
    # The first daemon keeps its row and keeps working.
    row = _server_row(rig)
    assert (row["pid"], row["state"]) == (first, "running")
    job = rig.submit([HOST])
    assert rig.run_agent(HOST) == 0
    assert rig.assignment(job, HOST)["state"] == "succeeded"
    rig.check([job])


def test_graceful_shutdown_exits_0_and_marks_the_server_stopped(rig: FaultRig) -> None:
    pid = rig.start_server()
    rig.enroll_all()
    job = rig.submit([HOST])
    assert rig.run_agent(HOST) == 0
    assert _server_row(rig)["state"] == "running"
    assert rig.kill_server(sig=signal.SIGTERM) == 0
    row = _server_row(rig)
    assert (row["pid"], row["state"]) == (pid, "stopped")
    log = rig.server_log()
    assert "SIGTERM received: shutting down" in log and "stopped cleanly" in log
    # A stopped instance key is free again at once.
    assert rig.restart_server() < 10
    assert _server_row(rig)["state"] == "running"
    rig.check([job])
