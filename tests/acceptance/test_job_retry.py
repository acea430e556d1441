"""``scire-admin job retry``: a finished job's failed hosts run it again as a
new attempt of the same job, through the real programs against a real server."""

from __future__ import annotations

import json

from conftest import Deployment, wait_for

from scire_server import admin_cli


def failing_once(marker: str) -> str:
    """A script that fails on web-1 the first time it runs there, then succeeds."""
    return (
        '[ "$SCIRE_CLIENT" = web-1 ] || { echo fine; exit 0; }\n'
        f'if [ -e {marker} ]; then echo "second try, attempt $SCIRE_ATTEMPT"; exit 0; fi\n'
        f"touch {marker}\n"
        "echo 'first try'\n"
        "exit 3\n"
    )


def test_retry_reruns_the_failed_host_and_keeps_the_old_attempt(running: Deployment) -> None:
    dep = running
    dep.enroll("web-1")
    dep.enroll("web-2")
    script = failing_once(str(dep.root / "tried"))
    job = dep.submit("--command", script, "--host", "web-1", "--host", "web-2")
    job_id = str(job)

    # Not final yet: refused, with the reason, exit 1.
    proc = dep.admin_run("job", "retry", job_id)
    assert proc.returncode == 1
    assert f"job {job} has not finished (hosts still pending)" in proc.stderr

    dep.run_agent("web-1")
    dep.run_agent("web-2")
    detail = dep.wait_job(job)
    states = {a["client"]: a["state"] for a in detail["assignments"]}
    assert states == {"web-1": "failed", "web-2": "succeeded"}

    answer = dep.admin("job", "retry", job_id)
    assert answer == {"job_id": job, "retried": ["web-1"], "refused": []}
    shown = {a["client"]: a for a in dep.job(job)["assignments"]}
    assert (shown["web-1"]["state"], shown["web-1"]["output"]) == ("pending", None)
    assert shown["web-2"]["state"] == "succeeded"

    dep.run_agent("web-1")
    detail = dep.wait_job(job)
    assert detail["state"] == "succeeded"
    web1 = {a["client"]: a for a in detail["assignments"]}["web-1"]
    assert web1["attempt"] == 2
    assert web1["output"] == "second try, attempt 2\n"

    # The previous attempt is in the audit trail, by the user who retried.
    events = dep.admin("audit", "--job", job_id)
    (retry,) = [e for e in events if e["action"] == "retry"]
    assert retry["actor"] == "user:admin"
    assert (retry["client"], retry["old_state"], retry["new_state"]) == (
        "web-1",
        "failed",
        "pending",
    )
    assert retry["detail"].startswith("attempt 1 failed; exit code 3")
    assert "first try" in retry["detail"]

    # Every host succeeded: nothing to retry.
    proc = dep.admin_run("job", "retry", job_id)
    assert proc.returncode == 1
    assert "has no failed or timed-out host to retry" in proc.stderr


def test_retry_of_named_hosts_and_its_refusals(running: Deployment) -> None:
    dep = running
    dep.enroll("web-1")
    dep.enroll("web-2")
    job = dep.submit("--command", "exit 4", "--host", "web-1", "--host", "web-2")
    dep.run_agent("web-1")
    dep.run_agent("web-2")
    assert dep.wait_job(job)["state"] == "failed"

    proc = dep.admin_run("job", "retry", str(job), "--host", "db-9")
    assert proc.returncode == 8  # NOT_FOUND
    assert f"job {job} has no host db-9" in proc.stderr
    proc = dep.admin_run("job", "retry", "999999")
    assert proc.returncode == 8

    # The table form, for one of the two hosts.
    proc = dep.admin_run("job", "retry", str(job), "--host", "web-2")
    table = dep.admin_run("job", "show", str(job))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["retried"] == ["web-2"]
    states = {a["client"]: a["state"] for a in json.loads(table.stdout)["assignments"]}
    assert states == {"web-1": "failed", "web-2": "pending"}

    # A cancelled job is not retried: submit it again instead.
    dep.admin("job", "cancel", str(job))
    proc = dep.admin_run("job", "retry", str(job), "--host", "web-1")
    assert proc.returncode == 1
    assert "was cancelled" in proc.stderr

    # A non-admin may not retry another user's job: to them it does not exist.
    alice = dep.add_user("alice")
    proc = dep.admin_run("job", "retry", str(job), bundle=alice)
    assert proc.returncode == 8


def test_a_schedules_run_is_retried_like_a_job(running: Deployment) -> None:
    dep = running
    dep.enroll("web-1")
    sid = dep.admin("job", "submit", "--host", "web-1", "--command", "exit 5", "--every", "2s")[
        "schedule_id"
    ]
    wait_for(
        lambda: dep.admin("schedule", "show", str(sid))["runs"], 300, "the schedule's first run"
    )
    dep.admin("schedule", "pause", str(sid))
    # The first run; later ones found it still pending on web-1 and skipped the host.
    job = min(r["job_id"] for r in dep.admin("schedule", "show", str(sid))["runs"])
    dep.run_agent("web-1")
    assert dep.wait_job(job)["state"] == "failed"
    assert dep.admin("job", "retry", str(job))["retried"] == ["web-1"]
    dep.run_agent("web-1")
    detail = dep.wait_job(job)
    assert detail["schedule_id"] == sid
    (assignment,) = detail["assignments"]
    assert (assignment["state"], assignment["attempt"], assignment["exit_code"]) == ("failed", 2, 5)


def test_the_audit_table_shows_a_retry_row_on_one_line() -> None:
    detail = "attempt 1 failed; exit code 3; output:\nfirst try\nstill failing\n"
    assert admin_cli.one_line(detail) == (
        "attempt 1 failed; exit code 3; output: (+2 lines: --json shows them)"
    )
    assert admin_cli.one_line("cancelled by alice") == "cancelled by alice"
    assert admin_cli.one_line(None) is None
