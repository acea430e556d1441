"""Live output end to end: a running job's output reaches the server in chunks,
``scire-admin job output --follow`` tails it, and a cancelled job or a killed
agent keeps what was produced. Real server, real agents, real TLS."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest
from conftest import Deployment, _exe, wait_for
from test_daemon import HOST, DaemonRig

#: Prints a line, waits for ``go`` in the agent's directory, prints another, then waits long.
TWO_LINES = "echo first; while [ ! -e ../../../go ]; do sleep 0.05; done; echo second; sleep 600"


def output_of(dep: Deployment, job_id: int, host: str) -> dict[str, Any]:
    proc = dep.admin_run("job", "output", str(job_id), "--host", host)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.splitlines()[-1]))


def follow(dep: Deployment, job_id: int, host: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            _exe("scire-admin"),
            "--server",
            dep.url,
            "--bundle",
            str(dep.bundle),
            "job",
            "output",
            str(job_id),
            "--host",
            host,
            "--follow",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=dep.root,
    )


@pytest.fixture
def rig(deployment: Deployment) -> Any:
    rig = DaemonRig(deployment)
    yield rig
    rig.close()


def test_follow_tails_a_daemon_job_and_a_cancel_keeps_its_output(rig: DaemonRig) -> None:
    rig.enroll(HOST, heartbeat_interval=0.5)
    rig.start()
    job = rig.submit("--command", TWO_LINES, "--timeout", "600")
    follower = follow(rig.dep, job, HOST)
    try:
        wait_for(
            lambda: output_of(rig.dep, job, HOST)["text"] == "first\n", 30, "the first line live"
        )
        assert rig.assignment(job)["state"] == "running"
        rig.go()
        wait_for(
            lambda: output_of(rig.dep, job, HOST)["text"] == "first\nsecond\n",
            30,
            "the second line live",
        )
        rig.dep.admin("job", "cancel", str(job))
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(30)
    # Each line once: resent chunks carry the whole output and the follower
    # prints only what is new. A cancelled host is "did not succeed": exit 5.
    assert out == "first\nsecond\n"
    assert follower.returncode == 5, err
    assert "cancelled" in err
    # The agent's final report (after it stopped the job) keeps the output too.
    wait_for(lambda: "cancelled reported" in rig.log(HOST), 30, "the cancelled report")
    row = rig.assignment(job)
    assert (row["state"], row["output"]) == ("cancelled", "first\nsecond\n")


def test_json_follow_streams_and_ends_with_the_exit_code_of_job_wait(rig: DaemonRig) -> None:
    rig.enroll(HOST, heartbeat_interval=0.5)
    rig.start()
    job = rig.submit("--command", "echo one; exit 3")
    proc = rig.dep.admin_run("job", "output", str(job), "--host", HOST, "--follow")
    assert proc.returncode == 5, proc.stderr
    pieces = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "".join(p["text"] for p in pieces) == "one\n"
    assert pieces[-1]["final"] and pieces[-1]["state"] == "failed"
    missing = rig.dep.admin_run("job", "output", str(job), "--host", "nobody")
    assert missing.returncode == 8 and "no host nobody" in missing.stderr


def test_normal_mode_sends_output_live_and_a_kill_9_keeps_it(deployment: Deployment) -> None:
    dep = deployment
    dep.start_server()
    dep.enroll("n1")
    config = dep.agent_dir("n1") / "client.ini"
    config.write_text("[client]\nheartbeat_interval = 0.5\nkill_grace = 1\n")
    script = "echo first; while [ ! -e ../../../go ]; do sleep 0.05; done; echo second"
    job = dep.submit("--host", "n1", "--command", script, "--timeout", "600")
    agent = subprocess.Popen(
        dep.agent_args("n1", "-c", str(config), "run"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: output_of(dep, job, "n1")["text"] == "first\n", 30, "the first line live")
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
    (row,) = dep.job(job)["assignments"]
    assert (row["state"], row["output"]) == ("running", "first\n")
    # The job outlived its agent; the next run waits for it and reports all of it.
    (dep.agent_dir("n1") / "go").touch()
    proc = dep.agent("n1", "-c", str(config), "run")
    assert proc.returncode == 0, proc.stderr
    (row,) = dep.job(job)["assignments"]
    assert (row["state"], row["output"]) == ("succeeded", "first\nsecond\n")
