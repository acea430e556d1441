"""Schedules end to end: ``scire-admin job submit --every/--cron/--at``, a real
server making the runs, a real agent (``scire-client run``) running them, the
``schedule`` commands, and a server downtime over several slots."""

from __future__ import annotations

import datetime as dt
import time
import zoneinfo
from typing import Any

from conftest import Deployment

from scire_schema import protocol


def utc(text: str) -> dt.datetime:
    """A wire time as aware UTC."""
    value = protocol.parse_time(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def schedule(dep: Deployment, schedule_id: int) -> Any:
    return dep.admin("schedule", "show", str(schedule_id))


def wait_for(what: str, check: Any, timeout: float = 300) -> Any:
    """``check()`` until it gives something; the bound only stops a broken run
    (a loaded machine makes every process start slowly)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


def test_an_every_2s_schedule_runs_on_a_real_agent(deployment: Deployment) -> None:
    dep = deployment
    dep.start_server()
    dep.enroll("web-1")
    answer = dep.admin(
        "job",
        "submit",
        "--host",
        "web-1",
        "--name",
        "tick",
        "--command",
        "echo tick",
        "--every",
        "2s",
    )
    sid = answer["schedule_id"]
    assert answer["accepted"] == ["web-1"] and answer["when"] == "every 2s"

    def two_runs_succeeded() -> list[dict[str, Any]]:
        dep.run_agent("web-1")
        done = [r for r in schedule(dep, sid)["runs"] if r["state"] == "succeeded"]
        return done if len(done) >= 2 else []

    done = wait_for("two runs to succeed", two_runs_succeeded)
    run = dep.job(done[0]["job_id"])
    assert (run["schedule_id"], run["schedule"]) == (sid, "tick")
    assert run["assignments"][0]["output"] == "tick\n"
    assert run["due_at"]

    listed = dep.admin("schedule", "list")
    assert [(s["id"], s["state"], s["when"]) for s in listed] == [(sid, "active", "every 2s")]
    assert dep.admin("schedule", "pause", str(sid))["state"] == "paused"
    paused_runs = schedule(dep, sid)["run_count"]
    assert dep.admin("schedule", "resume", str(sid))["state"] == "active"
    assert schedule(dep, sid)["run_count"] >= paused_runs
    assert dep.admin("schedule", "delete", str(sid))["state"] == "deleted"
    assert dep.admin("schedule", "list") == []
    assert [s["id"] for s in dep.admin("schedule", "list", "--all")] == [sid]
    actions = {e["action"] for e in dep.admin("audit", "--limit", "1000")}
    assert {
        "schedule_created",
        "schedule_paused",
        "schedule_resumed",
        "schedule_deleted",
        "run_created",
    } <= actions


def test_scire_admin_refuses_bad_schedules_before_calling(deployment: Deployment) -> None:
    dep = deployment  # no server: every refusal below is the CLI's own
    for args, words in (
        (("--every", "0s"), "at least 1 second"),
        (("--every", "soon"), "not a duration"),
        (("--cron", "* * *"), "five"),
        (("--cron", "0 3 * * *", "--timezone", "Mars/Olympus"), "time zone"),
        (("--at", "2001-01-01 00:00"), "in the past"),
        (("--timezone", "Europe/Berlin"), "for schedules"),
        (("--every", "1m", "--not-before", "2030-01-01T00:00"), "single job"),
    ):
        proc = dep.admin_run("job", "submit", "--host", "web-1", "--command", "true", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert words in proc.stderr, (args, proc.stderr)
    proc = dep.admin_run(
        "job", "submit", "--host", "x", "--command", "true", "--every", "1m", "--cron", "* * * * *"
    )
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


def test_cron_and_at_schedules_and_other_users(deployment: Deployment) -> None:
    dep = deployment
    dep.start_server()
    dep.enroll("web-1")
    cron = dep.admin(
        "job",
        "submit",
        "--host",
        "web-1",
        "--command",
        "true",
        "--cron",
        "30 3 * * 1-5",
        "--timezone",
        "Europe/Berlin",
        "--catch-up",
        "skip",
    )
    shown = schedule(dep, cron["schedule_id"])
    assert shown["when"] == "cron 30 3 * * 1-5 (Europe/Berlin)"
    assert shown["catch_up"] == "skip"
    due = utc(shown["next_due_at"])
    local = due.astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (3, 30) and local.weekday() < 5
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).strftime("%Y-%m-%d %H:%M")
    at = dep.admin("job", "submit", "--host", "web-1", "--command", "true", "--at", later)
    assert schedule(dep, at["schedule_id"])["when"].startswith("at ")
    alice = dep.add_user("alice")
    error = dep.admin_fails("schedule", "pause", str(cron["schedule_id"]), bundle=alice)
    assert f"no schedule {cron['schedule_id']}" in error
    assert dep.admin("schedule", "list", bundle=alice) == []


def test_after_a_downtime_over_several_slots_a_schedule_runs_once(
    deployment: Deployment,
) -> None:
    dep = deployment
    dep.start_server()
    dep.enroll("web-1")
    sid = dep.admin(
        "job", "submit", "--host", "web-1", "--command", "true", "--every", "2s", "--allow-overlap"
    )["schedule_id"]
    wait_for("a first run", lambda: schedule(dep, sid)["run_count"] >= 1)
    dep.stop_server()
    time.sleep(7)  # the daemon is down over at least three 2-second slots
    restarted = dt.datetime.now(dt.UTC)
    dep.start_server()

    def made_since_restart() -> Any:
        detail = schedule(dep, sid)
        new = [r for r in detail["runs"] if utc(r["created_at"]) >= restarted]
        return detail if new else None

    detail = wait_for("a run after the restart", made_since_restart)
    made_late = [
        utc(r["due_at"])
        for r in detail["runs"]
        if utc(r["created_at"]) >= restarted and utc(r["due_at"]) < restarted
    ]
    # One run for the whole gap (catch-up once), due at the first slot missed.
    assert len(made_late) == 1
