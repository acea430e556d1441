"""kill -9 of the server (and of agents) in the middle of dispatch, under load:
nothing is lost and nothing runs twice."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import pytest
from conftest import Deployment
from harness import MARK, FaultRig, ManualAgent

HOSTS = ("host1", "host2", "host3")  # their agents run while the server is killed
VICTIM = "host4"  # polled by hand just before each kill; its agent runs afterwards
JOBS = 30  # each for every host: 120 assignments


@pytest.fixture
def rig(deployment: Deployment) -> Iterator[FaultRig]:
    rig = FaultRig(deployment, (*HOSTS, VICTIM), {"poll_batch": "3"})
    yield rig
    rig.close()


def test_server_killed_during_dispatch_loses_and_repeats_nothing(rig: FaultRig) -> None:
    rig.start_server("--ack-timeout", "5", "--sweep-interval", "1")
    rig.enroll_all()
    jobs = rig.submit_many(JOBS, script=f"{MARK}; sleep 0.05")
    total = JOBS * len(rig.hosts)
    restarts: list[float] = []
    in_flight = 0
    for fraction in (0.2, 0.55):
        agents = [rig.spawn_agent(h) for h in HOSTS]
        rig.wait_lines(JOBS * len(HOSTS) * fraction)
        # A poll answer in flight when the server dies: sent, never acknowledged.
        with ManualAgent(rig.dep, VICTIM) as victim:
            in_flight += len(victim.poll(limit=3)["jobs"])
        assert rig.kill_server(sig=signal.SIGKILL) == -signal.SIGKILL
        for agent in agents:
            # The agents notice: the job at hand finishes, its report waits on disk.
            assert agent.wait(30) in (0, 1)
        restarts.append(rig.restart_server())
    # The same instance key starts at once: the dead pid does not hold it.
    assert max(restarts) < 10, restarts
    log = rig.server_log()
    assert log.count("recovery of ") == 3
    returned = sum(int(n) for n in re.findall(r"leases_returned=(\d+)", log))
    assert returned >= in_flight > 0
    rounds = rig.run_until_done(jobs)
    tally = rig.check(jobs)
    redelivered = sum(rig.agent_log(h).count("duplicate delivery") for h in rig.hosts)
    print(
        f"\n{tally.line(rig.kills)} leases_returned_at_restart={returned} "
        f"duplicate_deliveries_ignored={redelivered} rounds_after_faults={rounds} "
        f"restart_seconds={[round(r, 2) for r in restarts]}"
    )
    assert rig.kills == 2
    assert tally.assignments == total
    assert tally.states == {"succeeded": total}
    assert tally.runs == total
    assert tally.lost == 0 and tally.duplicates == 0


def test_agents_and_server_killed_under_load(rig: FaultRig) -> None:
    """Waves of work; in each, one agent gets SIGKILL at some point and then the
    server. A job whose agent died while it ran fails with "agent restarted"
    (it does not allow a rerun) and ran at most once; every other job succeeds
    and ran exactly once."""
    rig.start_server("--ack-timeout", "3", "--sweep-interval", "1")
    rig.enroll_all()
    # The hand-made polls take the same jobs of VICTIM in every wave: three
    # unacknowledged deliveries would make them undeliverable at max_attempts=3.
    jobs = rig.submit_many(JOBS, script=f"{MARK}; sleep 0.05", max_attempts=5)
    total = JOBS * len(rig.hosts)
    done = JOBS * len(HOSTS)
    agent_kills = 0
    for wave, (agent_at, server_at) in enumerate(((0.1, 0.25), (0.35, 0.5), (0.6, 0.75))):
        agents = {h: rig.spawn_agent(h) for h in HOSTS}
        rig.wait_lines(done * agent_at)
        victim = HOSTS[wave % len(HOSTS)]
        if agents[victim].poll() is None:
            assert rig.kill_agent(agents[victim]) == -signal.SIGKILL
            agent_kills += 1
        rig.wait_lines(done * server_at)
        with ManualAgent(rig.dep, VICTIM) as by_hand:
            by_hand.poll(limit=2)
        assert rig.kill_server(sig=signal.SIGKILL) == -signal.SIGKILL
        for host, agent in agents.items():
            if host != victim:
                assert agent.wait(30) in (0, 1)
        rig.restart_server()
    rounds = rig.run_until_done(jobs)
    tally = rig.check(jobs)
    crashed = rig.query("SELECT job_id, state, reason FROM assignments WHERE state != 'succeeded'")
    print(
        f"\n{tally.line(rig.kills)} agent_kills={agent_kills} "
        f"failed_agent_restarted={len(crashed)} rounds_after_faults={rounds}"
    )
    assert agent_kills >= 2
    assert rig.kills == agent_kills + 3
    assert tally.assignments == total and tally.lost == 0 and tally.duplicates == 0
    # An agent runs one job at a time: each kill can cut at most one job short.
    assert len(crashed) <= agent_kills
    assert all((r["state"], r["reason"]) == ("failed", "agent restarted") for r in crashed)
    assert tally.states["succeeded"] == total - len(crashed)
