"""The main path: a job from scire-admin to an agent and back."""

from __future__ import annotations

from conftest import Deployment


def test_job_runs_end_to_end(running: Deployment) -> None:
    running.enroll("host1")
    job_id = running.submit("--command", "echo hello from $SCIRE_JOB_ID", "--host", "host1")
    running.run_agent("host1")
    job = running.wait_job(job_id, timeout=10)
    assert job["state"] == "succeeded"
    (assignment,) = job["assignments"]
    assert assignment["client"] == "host1"
    assert assignment["exit_code"] == 0
    assert assignment["output"] == f"hello from {job_id}\n"
