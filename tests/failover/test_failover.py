"""The failover pair under load: two server daemons on one PostgreSQL primary
with a synchronous standby, 22 agents (12 daemon-mode, 10 normal-mode) given
both URLs, 220 assignments in flight per test, and one fault per test: a
daemon killed, the database restarted, every daemon down for a while, the
primary killed and the standby promoted. After each, every job ran exactly
once and reached one final state (``FaultRig.check``).

One deployment serves the whole module (enrolling 22 agents and building the
replicated database are the expensive part), and its agents run throughout;
each test starts from both daemons up, submits its own jobs, and empties the
run logs after its check. The promotion test comes last: it leaves the standby
as the only database.

The dead daemon's leases come back when their ack deadline runs out
(``--ack-timeout 5``): written against that; a faster takeover only makes
these tests quicker.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Deployment, wait_for
from fault.harness import MARK, FaultRig, ManualAgent
from pgnodes import ReplicatedPair

DAEMON_HOSTS = tuple(f"d{i:02}" for i in range(12))
NORMAL_HOSTS = tuple(f"n{i:02}" for i in range(10))
HOSTS = DAEMON_HOSTS + NORMAL_HOSTS
JOBS = 15  # the first NORMAL_JOBS for every host, the rest for the daemon-mode ones:
NORMAL_JOBS = 4  # 4 * 22 + 11 * 12 = 220 assignments (a normal-mode run takes its jobs in turn)
TOTAL = NORMAL_JOBS * len(HOSTS) + (JOBS - NORMAL_JOBS) * len(DAEMON_HOSTS)
SERVER_OPTIONS = ("--ack-timeout", "5", "--sweep-interval", "1", "--lost-after", "60")
#: The marker, and a little work so that jobs are still running when the fault hits.
SCRIPT = f"{MARK}; sleep 0.2"


@pytest.fixture(scope="module")
def database() -> Iterator[ReplicatedPair]:
    pair = ReplicatedPair()
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="module")
def pair(
    database: ReplicatedPair, tmp_path_factory: pytest.TempPathFactory, xprocess: Any
) -> Iterator[FaultRig]:
    dep = Deployment(tmp_path_factory.mktemp("pair"), xprocess, database.url)
    rig = FaultRig(
        dep,
        HOSTS,
        {"poll_batch": "10", "connect_timeout": "10"},
        daemon_hosts=DAEMON_HOSTS,
    )
    # Daemon-mode agents poll as often as the server suggests: quickly here,
    # so that they notice a dead daemon (and its return) within seconds.
    config = dep.root / "server.ini"
    config.write_text("[server]\npoll_interval = 2\n")
    options = ("-c", str(config), *SERVER_OPTIONS)
    try:
        rig.start_server(*options, name="a")
        rig.start_server(*options, name="b")
        rig.enroll_all()
        # The agents work for the whole module: between tests they idle.
        rig.start_agents(pause=1)
        yield rig
    finally:
        rig.close()


@pytest.fixture
def rig(pair: FaultRig) -> FaultRig:
    """The module's pair with both daemons up."""
    pair.reset_admin()  # the daemons may have closed an idle connection
    for name in pair.daemons:
        if not pair.server_running(name):
            pair.restart_server(name)
    return pair


def _run_with_fault(rig: FaultRig, fault: Any, at: float = 0.3) -> list[int]:
    """Submit the load, apply ``fault`` once ``at`` of it ran, wait until every
    assignment is final; the job ids, checked."""
    # An acknowledgement that times out while the database is away leaves its
    # lease to come back: more attempts than the default three, so that a job
    # does not end "undeliverable" while its agent has it (the point here is
    # that nothing is lost or run twice).
    spec = {"script": SCRIPT, "max_attempts": 10}
    jobs = rig.submit_many(NORMAL_JOBS, **spec)
    jobs += rig.submit_many(JOBS - NORMAL_JOBS, DAEMON_HOSTS, **spec)
    total = TOTAL
    rig.wait_lines(total * at, timeout=120)
    fault()
    wait_for(lambda: rig.all_final(jobs), 180, "every assignment to be final", step=0.5)
    tally = rig.check(jobs)
    print(f"\n{tally.line(rig.kills)}")
    assert tally.assignments == total
    assert tally.states == {"succeeded": total}
    assert tally.runs == total and tally.lost == 0 and tally.duplicates == 0
    rig.forget_runs()
    return jobs


def test_a_daemon_killed_mid_run(rig: FaultRig) -> None:
    """kill -9 of daemon a: the agents move to b, a's unacknowledged leases come
    back, nothing is lost or run twice; a, restarted, serves again."""

    def kill_a() -> None:
        assert rig.kill_server("a", signal.SIGKILL) == -signal.SIGKILL

    _run_with_fault(rig, kill_a)
    moved = [h for h in DAEMON_HOSTS if "failing over to server" in rig.agent_log(h)]
    assert moved, "no daemon-mode agent failed over"
    rig.restart_server("a")
    assert "recovery of " in rig.server_log("a")
    # a answers agents again: an agent's poll through it (nothing is due).
    with ManualAgent(rig.dep, HOSTS[0]) as agent:
        assert agent.poll()["jobs"] == []
    # And it takes work: a job submitted through it runs.
    job = rig.submit([NORMAL_HOSTS[0]])
    wait_for(lambda: rig.states([job]) == {"succeeded": 1}, 60, "the job through a to run")
    rig.forget_runs()


def test_postgres_restarted_mid_run(rig: FaultRig, database: ReplicatedPair) -> None:
    """The primary stopped at once (crash recovery at start) and started again:
    the daemons reconnect, nothing is lost."""
    _run_with_fault(rig, database.primary.restart)
    wait_for(database.synchronous, 60, "the standby to catch up again")


def test_every_daemon_down_for_a_while(rig: FaultRig) -> None:
    """Both daemons killed: the agents finish what they hold, keep its reports
    in the spool, retry, and deliver them once the daemons are back."""

    def outage() -> None:
        marks = {h: len(rig.agent_log(h)) for h in HOSTS}
        for name in ("a", "b"):
            rig.kill_server(name, signal.SIGKILL)
        # A while: until every agent has failed to reach either server.
        wait_for(
            lambda: all("no server answered" in rig.agent_log(h)[marks[h] :] for h in HOSTS),
            60,
            "every agent to notice the outage",
        )
        spooled = [h for h in HOSTS if any((rig.dep.agent_dir(h) / "spool").glob("*/report*"))]
        print(f"\nagents with undelivered reports during the outage: {len(spooled)}")
        for name in ("a", "b"):
            rig.restart_server(name)

    _run_with_fault(rig, outage)


def test_database_failover_to_the_standby(rig: FaultRig, database: ReplicatedPair) -> None:
    """kill -9 of the primary's postmaster, promotion of the synchronous
    standby: the daemons find it through the multi-host URL and carry on; no
    acknowledged job or report is lost."""
    _run_with_fault(rig, database.fail_over)
    assert not database.primary.pid()
    (row,) = database.standby.sql("SELECT count(*) FROM jobs", dbname="scire")
    assert int(str(row[0])) >= 2 * JOBS
