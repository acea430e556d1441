"""Faults on the agent's side: killed while a job runs, killed before it
acknowledged, a duplicated delivery, the server gone while it reports, and
cancellation of a held and of a running job."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from conftest import Deployment
from harness import MARK, STARTS_LOG, FaultRig, ManualAgent, process_gone, wait_for

from scire_schema import documents

HOST = "host1"
#: Records that it started, runs long, and records that it completed.
STARTED = f'echo "$SCIRE_JOB_ID" >> ../../../{STARTS_LOG}'
SLOW = f"{STARTED}; sleep 30; {MARK}"
#: Slow only on its first execution on this host.
SLOW_ONCE = (
    f'{STARTED}; [ "$(grep -cx "$SCIRE_JOB_ID" ../../../{STARTS_LOG})" -gt 1 ] || sleep 30; {MARK}'
)


@pytest.fixture
def rig(deployment: Deployment) -> Iterator[FaultRig]:
    rig = FaultRig(deployment, [HOST])
    yield rig
    rig.close()


def _kill_agent_while_running(rig: FaultRig, job: int) -> int:
    """Start the agent, SIGKILL it once the job runs, and the job's wrapper with it,
    so how the job ends can never be known (a wrapper that lives on makes the next
    agent re-attach instead: tests/acceptance/test_daemon.py); the job's process
    group id."""
    agent = rig.spawn_agent(HOST)
    wait_for(lambda: rig.lines(HOST, STARTS_LOG) == [job], 30, "the job to start")
    wait_for(lambda: rig.assignment(job, HOST)["state"] == "running", 10, "running reported")
    pgid = int(rig.journal(HOST, job)["pgid"])
    wrapper = int(rig.journal(HOST, job)["wrapper_pid"])
    agent.kill()
    assert agent.wait(10) == -signal.SIGKILL
    os.kill(wrapper, signal.SIGKILL)
    wait_for(lambda: process_gone(wrapper), 10, "the wrapper to die")
    # The server is told nothing; the job's process group outlives the agent.
    assert not process_gone(pgid)
    assert rig.journal(HOST, job)["state"] == "started"
    assert rig.assignment(job, HOST)["state"] == "running"
    return pgid


def test_agent_killed_while_job_runs_reports_agent_restarted(rig: FaultRig) -> None:
    rig.start_server()
    rig.enroll_all()
    job = rig.submit([HOST], SLOW, timeout=120)
    pgid = _kill_agent_while_running(rig, job)
    started = time.monotonic()
    assert rig.run_agent(HOST) == 0
    assert time.monotonic() - started < 20  # the orphan was killed, not waited for
    assert process_gone(pgid)
    row = rig.assignment(job, HOST)
    assert (row["state"], row["reason"], row["attempt"]) == ("failed", "agent restarted", 1)
    # It started once and never completed; nothing ran it again.
    assert rig.lines(HOST, STARTS_LOG) == [job]
    assert rig.lines(HOST) == []
    assert rig.journal(HOST, job)["state"] == "reported"
    tally = rig.check([job])
    assert tally.states == {"failed": 1} and tally.duplicates == 0


def test_agent_killed_while_job_runs_reruns_it_when_allowed(rig: FaultRig) -> None:
    rig.start_server()
    rig.enroll_all()
    job = rig.submit([HOST], SLOW_ONCE, timeout=120, rerun_on_agent_crash=True)
    pgid = _kill_agent_while_running(rig, job)
    delivery = rig.assignment(job, HOST)["delivery_id"]
    assert rig.run_agent(HOST) == 0
    assert process_gone(pgid)
    row = rig.assignment(job, HOST)
    assert row["state"] == "succeeded"
    # The rerun is the agent's own, from its spool: the same (single) delivery.
    assert (row["attempt"], row["delivery_id"]) == (1, delivery)
    # Two executions started -- the killed one and the rerun -- and exactly one
    # completed: the killed one was stopped before it reached its end.
    assert rig.lines(HOST, STARTS_LOG) == [job, job]
    assert rig.lines(HOST) == [job]
    tally = rig.check([job])
    assert tally.runs == 1 and tally.duplicates == 0


def test_unacknowledged_delivery_is_redelivered_and_runs_once(rig: FaultRig) -> None:
    """An agent that dies between receiving a job and acknowledging it: here the
    "agent" is a hand-made poll with its certificate that never acknowledges."""
    rig.start_server("--ack-timeout", "2", "--sweep-interval", "1")
    rig.enroll_all()
    job = rig.submit([HOST])
    with ManualAgent(rig.dep, HOST) as dying:
        (xml,) = dying.poll()["jobs"]
    first = documents.parse_job(xml)
    assert first.job_id == job and first.attempt == 1
    assert rig.assignment(job, HOST)["state"] == "sent"
    wait_for(lambda: rig.assignment(job, HOST)["state"] == "pending", 15, "the lease to expire")
    (expired,) = rig.events(job, "lease_expired")
    assert (expired["old_state"], expired["new_state"]) == ("sent", "pending")
    assert rig.run_agent(HOST) == 0
    row = rig.assignment(job, HOST)
    assert (row["state"], row["attempt"]) == ("succeeded", 2)
    assert row["delivery_id"] != first.delivery_id
    assert rig.lines(HOST) == [job]
    rig.check([job])


def test_duplicated_delivery_runs_once_and_is_acknowledged_again(rig: FaultRig) -> None:
    rig.start_server("--poll-cache-check", "1")
    rig.enroll_all()
    job = rig.submit([HOST])
    assert rig.run_agent(HOST) == 0
    first = rig.assignment(job, HOST)
    assert first["state"] == "succeeded"
    # Force a second delivery of the same job to the same agent, behind the
    # server's back: no announcement says so, the poll cache's safety check
    # (every second here) finds it.
    assert rig.execute("UPDATE assignments SET state = 'pending' WHERE id = ?", first["id"]) == 1
    time.sleep(2)
    assert rig.run_agent(HOST) == 0
    row = rig.assignment(job, HOST)
    assert (row["state"], row["attempt"]) == ("succeeded", 2)
    assert row["delivery_id"] != first["delivery_id"]
    # The first delivery was started at once (its acknowledgement said so), the
    # duplicate only acknowledged.
    assert [e["new_state"] for e in rig.events(job, "acknowledge")] == ["running", "acknowledged"]
    assert "duplicate delivery" in rig.agent_log(HOST)
    assert rig.lines(HOST) == [job]  # ran once
    # The agent re-sent the kept result under the new delivery.
    journal = rig.journal(HOST, job)
    assert (journal["state"], journal["delivery_id"]) == ("reported", row["delivery_id"])
    tally = rig.check([job], one_final_event=False)
    assert tally.runs == 1 and tally.duplicates == 0


def test_report_waits_on_disk_while_the_server_is_down(rig: FaultRig) -> None:
    rig.start_server()
    rig.enroll_all()
    job = rig.submit([HOST], f"{STARTED}; sleep 2; {MARK}")
    agent = rig.spawn_agent(HOST)
    wait_for(lambda: rig.assignment(job, HOST)["state"] == "running", 30, "the job to run")
    assert rig.kill_server(sig=signal.SIGTERM) == 0
    # The job completes; its report cannot be delivered; the run gives up with 1.
    assert agent.wait(30) == 1
    assert rig.lines(HOST) == [job]
    assert rig.journal(HOST, job)["state"] == "finished"
    assert rig.assignment(job, HOST)["state"] == "running"
    rig.restart_server()
    assert rig.run_agent(HOST) == 0
    row = rig.assignment(job, HOST)
    assert (row["state"], row["exit_code"]) == ("succeeded", 0)
    assert rig.journal(HOST, job)["state"] == "reported"
    assert rig.lines(HOST) == [job]
    rig.check([job])


def test_cancelled_held_and_running_jobs(rig: FaultRig) -> None:
    rig.start_server()
    rig.enroll_all()
    running = rig.submit([HOST], SLOW, priority=10, timeout=120)
    held = rig.submit([HOST], MARK)
    agent = rig.spawn_agent(HOST)
    wait_for(lambda: rig.lines(HOST, STARTS_LOG) == [running], 30, "the first job to start")
    assert rig.journal(HOST, held)["state"] == "received"
    pgid = int(rig.journal(HOST, running)["pgid"])
    started = time.monotonic()
    assert rig.cancel(running) == 1
    assert rig.cancel(held) == 1
    # The agent learns at its next heartbeat poll, kills the job and reports.
    assert agent.wait(30) == 0
    assert time.monotonic() - started < 15
    assert process_gone(pgid)
    for job in (running, held):
        row = rig.assignment(job, HOST)
        assert row["state"] == "cancelled", job
        assert rig.journal(HOST, job)["state"] == "reported"
        result = documents.parse_status(rig.spool_file(HOST, job, "result.xml"))
        assert result.state == "cancelled"
    assert "cancelled by the server while running" in rig.agent_log(HOST)
    assert rig.lines(HOST, STARTS_LOG) == [running]
    assert rig.lines(HOST) == []
    tally = rig.check([running, held])
    assert tally.states == {"cancelled": 2} and tally.runs == 0
