"""When a schedule runs: durations, time zones, cron's weekdays, and the runs a
tick makes after a gap under each catch-up policy. Every time is given, none read."""

from __future__ import annotations

import datetime as dt

import pytest

from scire_schema.protocol import CatchUp, ScheduleKind
from scire_server import recurrence
from scire_server.recurrence import Recurrence, RecurrenceError

T0 = dt.datetime(2026, 3, 25, 12, 0, tzinfo=dt.UTC)  # a Wednesday
BERLIN = recurrence.zone("Europe/Berlin")


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10s", 10), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("90", 90)],
)
def test_durations(text: str, expected: int) -> None:
    assert recurrence.parse_duration(text) == expected
    assert recurrence.parse_duration(recurrence.format_duration(expected)) == expected


@pytest.mark.parametrize("text", ["0s", "0", "-5m", "abc", "10x", "", "1m1h", "1.5h", "400d"])
def test_bad_durations_are_refused_with_a_clear_message(text: str) -> None:
    with pytest.raises(RecurrenceError) as info:
        recurrence.parse_duration(text)
    assert any(word in str(info.value) for word in ("duration", "at least", "longer"))


@pytest.mark.parametrize("name", ["Mars/Olympus", "../../etc/passwd", "", "Europe/Berlin\n"])
def test_bad_time_zones_are_refused(name: str) -> None:
    with pytest.raises(RecurrenceError, match="time zone"):
        recurrence.zone(name)


def test_an_at_time_without_offset_is_in_the_given_zone() -> None:
    assert recurrence.parse_at("2026-12-01 03:00", "Europe/Berlin") == dt.datetime(
        2026, 12, 1, 2, 0, tzinfo=dt.UTC
    )
    assert recurrence.parse_at("2026-12-01T03:00+05:00", "Europe/Berlin") == dt.datetime(
        2026, 11, 30, 22, 0, tzinfo=dt.UTC
    )
    with pytest.raises(RecurrenceError, match="not a time"):
        recurrence.parse_at("tomorrow")


def test_an_at_time_in_the_past_is_refused() -> None:
    with pytest.raises(RecurrenceError, match="in the past"):
        Recurrence.from_request("at", "2026-03-25 11:00", "UTC", T0)
    once = Recurrence.from_request("at", "2026-03-25 14:00", "Europe/Berlin", T0)
    assert once.first() == dt.datetime(2026, 3, 25, 13, 0, tzinfo=dt.UTC)
    assert once.after(once.first() or T0) is None


def test_every_runs_at_once_then_every_interval() -> None:
    every = Recurrence.from_request("every", "10s", "UTC", T0)
    assert every.first() == T0
    assert every.after(T0) == T0 + seconds(10)
    assert every.upcoming(T0 + seconds(65)) == T0 + seconds(70)


@pytest.mark.parametrize(
    ("weekday", "expected"),
    [
        ("0", {"Sunday"}),
        ("7", {"Sunday"}),
        ("1-5", {"Monday", "Friday"}),
        ("sat,sun", {"Saturday", "Sunday"}),
    ],
)
def test_cron_weekdays_count_as_cron_does(weekday: str, expected: set[str]) -> None:
    """APScheduler 3 counts 0 as Monday; a cron user means Sunday."""
    cron = Recurrence.from_request("cron", f"0 3 * * {weekday}", "UTC", T0)
    seen = set()
    slot = cron.first()
    for _ in range(7):
        assert slot is not None
        seen.add(f"{slot:%A}")
        slot = cron.after(slot)
    assert expected <= seen
    if len(expected) == 1:
        assert seen == expected


def test_cron_runs_in_its_time_zone_across_daylight_saving() -> None:
    """03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer (from 29 March 2026)."""
    cron = Recurrence.from_request("cron", "0 3 * * *", "Europe/Berlin", T0)
    first = cron.first()
    assert first == dt.datetime(2026, 3, 26, 2, 0, tzinfo=dt.UTC)
    slots = [first]
    for _ in range(4):
        following = cron.after(slots[-1] or T0)
        slots.append(following)
    assert [s.astimezone(BERLIN).hour for s in slots if s] == [3, 3, 3, 3, 3]
    assert slots[-1] == dt.datetime(2026, 3, 30, 1, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "expression",
    [
        "* * * *",
        "61 * * * *",
        "* 25 * * *",
        "* * * * 8",
        "* * * * 5-1",
        "*/0 * * * *",
        "0 0 31 2 *",
        "x y z a b",
    ],
)
def test_bad_cron_expressions_are_refused(expression: str) -> None:
    with pytest.raises(RecurrenceError, match="cron|day of week"):
        Recurrence.from_request("cron", expression, "UTC", T0)


def test_a_kind_that_is_none_of_at_every_cron_is_refused() -> None:
    with pytest.raises(RecurrenceError, match="not at, every or cron"):
        Recurrence.from_request("hourly", "1", "UTC", T0)


# --- catch-up ------------------------------------------------------------------------

EVERY_10S = Recurrence(ScheduleKind.EVERY, "10", "UTC", T0)
AFTER_GAP = T0 + seconds(65)  # slots 10, 20, ..., 60 s came due while no daemon ran


def test_on_time_every_policy_runs_the_slot() -> None:
    for policy in CatchUp:
        plan = recurrence.plan(EVERY_10S, T0 + seconds(10), T0 + seconds(10.4), policy, 5)
        assert plan.runs == [T0 + seconds(10)]
        assert plan.next_due == T0 + seconds(20)


def test_nothing_is_due_before_the_slot() -> None:
    plan = recurrence.plan(EVERY_10S, T0 + seconds(10), T0 + seconds(9), CatchUp.ONCE, 5)
    assert plan.runs == [] and plan.next_due == T0 + seconds(10)


def test_catch_up_once_makes_one_run_for_the_whole_gap() -> None:
    plan = recurrence.plan(EVERY_10S, T0 + seconds(10), AFTER_GAP, CatchUp.ONCE, 5)
    # Due at the first slot missed, which every daemon computes alike.
    assert plan.runs == [T0 + seconds(10)]
    assert plan.next_due == T0 + seconds(70)
    assert plan.skipped == 5


def test_catch_up_all_makes_a_run_per_slot() -> None:
    plan = recurrence.plan(EVERY_10S, T0 + seconds(10), AFTER_GAP, CatchUp.ALL, 5)
    assert plan.runs == [T0 + seconds(s) for s in (10, 20, 30, 40, 50, 60)]
    assert plan.next_due == T0 + seconds(70)


def test_catch_up_all_is_bounded_per_tick_and_goes_on_at_the_next() -> None:
    every_second = Recurrence(ScheduleKind.EVERY, "1", "UTC", T0)
    now = T0 + seconds(250)
    first = recurrence.plan(every_second, T0, now, CatchUp.ALL, 5)
    assert len(first.runs) == recurrence.MAX_RUNS_PER_TICK
    assert first.next_due == T0 + seconds(recurrence.MAX_RUNS_PER_TICK)
    assert first.next_due is not None
    second = recurrence.plan(every_second, first.next_due, now, CatchUp.ALL, 5)
    assert second.runs[0] == T0 + seconds(recurrence.MAX_RUNS_PER_TICK)


def test_catch_up_skip_drops_the_slots_later_than_the_grace() -> None:
    plan = recurrence.plan(EVERY_10S, T0 + seconds(10), AFTER_GAP, CatchUp.SKIP, 3)
    assert plan.runs == []
    assert plan.next_due == T0 + seconds(70)
    # A grace that reaches back to the slot at 60 s runs that one, and only it.
    plan = recurrence.plan(EVERY_10S, T0 + seconds(10), AFTER_GAP, CatchUp.SKIP, 8)
    assert plan.runs == [T0 + seconds(60)]


def test_a_missed_at_runs_once_or_is_skipped() -> None:
    at = Recurrence(ScheduleKind.AT, (T0 + seconds(10)).isoformat(), "UTC", T0)
    late = T0 + seconds(3600)
    assert recurrence.plan(at, T0 + seconds(10), late, CatchUp.ONCE, 10).runs == [T0 + seconds(10)]
    assert recurrence.plan(at, T0 + seconds(10), late, CatchUp.ALL, 10).next_due is None
    skipped = recurrence.plan(at, T0 + seconds(10), late, CatchUp.SKIP, 10)
    assert skipped.runs == [] and skipped.next_due is None


def test_a_cron_gap_in_berlin_runs_once_at_the_first_missed_slot() -> None:
    cron = Recurrence.from_request("cron", "0 3 * * *", "Europe/Berlin", T0)
    first = cron.first()
    assert first is not None
    three_days_later = first + dt.timedelta(days=3, hours=1)
    plan = recurrence.plan(cron, first, three_days_later, CatchUp.ONCE, 10)
    assert plan.runs == [first]
    assert plan.next_due is not None
    assert plan.next_due.astimezone(BERLIN).hour == 3
    assert plan.next_due > three_days_later
    assert len(recurrence.plan(cron, first, three_days_later, CatchUp.ALL, 10).runs) == 4
