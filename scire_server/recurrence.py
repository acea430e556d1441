"""When a schedule's runs are due: durations, time zones, cron expressions,
and the slots a schedule runs after a gap (its catch-up policy).

Pure functions over APScheduler's triggers (``DateTrigger``, ``IntervalTrigger``,
``CronTrigger``); nothing here reads the clock or the database, so the same
answers come out on every daemon and in the tests. Times handed in and out
are aware UTC; the store keeps them naive UTC.

Bad input raises :class:`RecurrenceError` (a ``ValueError``) with a message
meant for the operator; the API turns it into ``InvalidArgument`` and
``scire-admin`` into a usage error.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from scire_schema.protocol import CatchUp, ScheduleKind

MIN_INTERVAL = 1  # seconds: the timed task ticks about once a second
MAX_INTERVAL = 366 * 86400  # seconds: a longer period is a job for --cron or --at
#: Runs one tick makes for one schedule with catch-up ``all``; the rest follow
#: at the next ticks, so a long gap never turns into one huge transaction.
MAX_RUNS_PER_TICK = 100
DEFAULT_TIMEZONE = "UTC"

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_TIMEZONE = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-/]{0,63}$")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_ONE_MICROSECOND = dt.timedelta(microseconds=1)


class RecurrenceError(ValueError):
    """A schedule's time, duration, zone or cron expression is not valid."""


def parse_duration(text: str) -> int:
    """Seconds in ``10s``, ``10m``, ``2h``, ``1d`` or a combination in that order
    (``1h30m``); bare digits are seconds. At least 1 s, at most 366 days."""
    cleaned = text.strip().lower() if isinstance(text, str) else ""
    match = _DURATION.match(cleaned) if cleaned else None
    if cleaned.isdigit():
        seconds = int(cleaned)
    elif match is None:
        raise RecurrenceError(
            f"{str(text)[:40]!r} is not a duration: use e.g. 30s, 10m, 2h, 1d or 1h30m"
        )
    else:
        days, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds < MIN_INTERVAL:
        raise RecurrenceError(f"the interval must be at least {MIN_INTERVAL} second, not {text!r}")
    if seconds > MAX_INTERVAL:
        raise RecurrenceError(
            f"the interval {text!r} is longer than 366 days; use --cron or --at instead"
        )
    return seconds


def format_duration(seconds: int) -> str:
    """``5400`` -> ``1h30m``: the shortest spelling :func:`parse_duration` reads back."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def zone(name: str) -> ZoneInfo:
    """The IANA time zone of this name (``Europe/Berlin``, ``UTC``)."""
    if not isinstance(name, str) or not _TIMEZONE.match(name) or ".." in name:
        raise RecurrenceError(f"{str(name)[:70]!r} is not a time zone name, e.g. Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise RecurrenceError(
            f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin"
        ) from None


def parse_at(text: str, timezone: str = DEFAULT_TIMEZONE) -> dt.datetime:
    """An ISO 8601 time (``2026-12-01T03:00``, ``2026-12-01 03:00``, with or without
    an offset) as aware UTC; a time without an offset is in ``timezone``."""
    if not isinstance(text, str):
        raise RecurrenceError("the time must be a string such as 2026-12-01 03:00")
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise RecurrenceError(
            f"{text[:40]!r} is not a time: use ISO 8601, e.g. 2026-12-01 03:00 "
            "or 2026-12-01T03:00+01:00"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone(timezone))
    return value.astimezone(dt.UTC)


def _weekday_field(text: str) -> str:
    """Cron's day-of-week field (0 or 7 Sunday, names allowed) in APScheduler's
    terms: APScheduler 3 counts 0 as Monday, so numbers are turned into names."""
    if text == "*":
        return text
    days: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise RecurrenceError(f"day of week {text!r}: step {step_text!r} is not valid")
        if body == "*":
            low, high = 0, 6
        elif "-" in body:
            first, _, last = body.partition("-")
            low, high = _weekday(first, text), _weekday(last, text)
        else:
            low = _weekday(body, text)
            high = 6 if step else low
        if low > high:
            raise RecurrenceError(f"day of week {text!r}: range {body!r} runs backwards")
        days.update(day % 7 for day in range(low, high + 1, step or 1))
    if days == set(range(7)):
        return "*"
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def _weekday(token: str, field: str) -> int:
    token = token.strip().lower()
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token)
    if token[:3] in _WEEKDAYS and len(token) == 3:
        return _WEEKDAYS.index(token)
    raise RecurrenceError(f"day of week {field!r}: {token!r} is not 0-7 or sun..sat")


def cron_trigger(expression: str, timezone: str = DEFAULT_TIMEZONE) -> CronTrigger:
    """The trigger of five cron fields (minute hour day month weekday) in a zone."""
    if not isinstance(expression, str) or len(expression) > 255:
        raise RecurrenceError("a cron expression is five fields, e.g. '*/15 * * * *'")
    fields = expression.split()
    if len(fields) != 5:
        raise RecurrenceError(
            f"cron expression {expression[:60]!r} has {len(fields)} field(s); it needs five: "
            "minute hour day-of-month month day-of-week, e.g. '30 3 * * 1-5'"
        )
    minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_weekday_field(weekday),
            timezone=zone(timezone),
        )
    except RecurrenceError:
        raise
    except ValueError as exc:
        raise RecurrenceError(f"cron expression {expression[:60]!r}: {exc}") from None


@dataclass(frozen=True)
class Recurrence:
    """When a schedule runs: its kind, its expression as stored (an ISO UTC time
    for ``at``, seconds for ``every``, the five fields for ``cron``), its time
    zone, and ``anchor``, the moment ``every`` counts from (its first run)."""

    kind: ScheduleKind
    expression: str
    timezone: str
    anchor: dt.datetime

    @classmethod
    def from_request(cls, kind: str, value: str, timezone: str, now: dt.datetime) -> Recurrence:
        """A recurrence from what the operator wrote (``--every 10m`` ...), checked;
        an ``at`` time must be in the future."""
        zone(timezone)
        if kind == ScheduleKind.AT:
            when = parse_at(value, timezone)
            if when <= now:
                raise RecurrenceError(f"{value} ({when:%Y-%m-%d %H:%M:%S} UTC) is in the past")
            return cls(ScheduleKind.AT, when.isoformat(), timezone, now)
        if kind == ScheduleKind.EVERY:
            return cls(ScheduleKind.EVERY, str(parse_duration(value)), timezone, now)
        if kind == ScheduleKind.CRON:
            expression = " ".join(value.split()) if isinstance(value, str) else value
            if cron_trigger(expression, timezone).get_next_fire_time(None, now) is None:
                raise RecurrenceError(f"cron expression {expression!r} names no time that exists")
            return cls(ScheduleKind.CRON, expression, timezone, now)
        raise RecurrenceError(f"schedule kind {str(kind)[:20]!r} is not at, every or cron")

    def trigger(self) -> BaseTrigger:
        if self.kind == ScheduleKind.AT:
            return DateTrigger(dt.datetime.fromisoformat(self.expression), timezone=dt.UTC)
        if self.kind == ScheduleKind.EVERY:
            return IntervalTrigger(
                seconds=int(self.expression), start_date=self.anchor, timezone=dt.UTC
            )
        return cron_trigger(self.expression, self.timezone)

    def describe(self) -> str:
        """How ``schedule list`` shows it: ``every 1h30m``, ``cron 0 3 * * * (Europe/Berlin)``."""
        if self.kind == ScheduleKind.EVERY:
            return f"every {format_duration(int(self.expression))}"
        if self.kind == ScheduleKind.AT:
            return f"at {self.expression}"
        return f"cron {self.expression} ({self.timezone})"

    def first(self) -> dt.datetime | None:
        """The first slot: the ``at`` time, the anchor of ``every``, the first cron
        time after the anchor."""
        return _utc(self.trigger().get_next_fire_time(None, self.anchor))

    def after(self, slot: dt.datetime) -> dt.datetime | None:
        """The slot that follows ``slot`` (``None``: there is none)."""
        return _utc(self.trigger().get_next_fire_time(slot, slot + _ONE_MICROSECOND))

    def at_or_after(self, moment: dt.datetime) -> dt.datetime | None:
        """The first slot at or after ``moment``."""
        if self.kind == ScheduleKind.AT:
            when = dt.datetime.fromisoformat(self.expression)
            return when if when >= moment else None
        return _utc(self.trigger().get_next_fire_time(None, moment))

    def upcoming(self, now: dt.datetime) -> dt.datetime | None:
        """The first slot strictly after ``now`` (``None`` for a past ``at``)."""
        if self.kind == ScheduleKind.AT:
            when = dt.datetime.fromisoformat(self.expression)
            return when if when > now else None
        return _utc(self.trigger().get_next_fire_time(None, now + _ONE_MICROSECOND))


@dataclass(frozen=True)
class Plan:
    """What one tick does for one schedule: the slots it makes runs for, and the
    schedule's next due time afterwards (``None``: it is finished)."""

    runs: list[dt.datetime]
    next_due: dt.datetime | None
    #: Slots passed over without a run (catch-up ``once`` or ``skip``).
    skipped: int


def plan(
    recurrence: Recurrence,
    next_due: dt.datetime,
    now: dt.datetime,
    catch_up: CatchUp | str,
    grace: float,
) -> Plan:
    """The runs due at ``now`` for a schedule whose next slot is ``next_due``.

    ``all``: one run per slot up to ``now`` (at most :data:`MAX_RUNS_PER_TICK`
    per call; the next due time then stays in the past and the next tick goes
    on). ``once``: one run, due at ``next_due`` (the first slot not yet run,
    which every daemon computes alike), for however many slots have passed.
    ``skip``: a run only for a slot at most ``grace`` seconds late (the earliest
    such), the older slots dropped. After ``once`` and ``skip`` the next due
    time is the first slot after ``now``.
    """
    if next_due > now:
        return Plan([], next_due, 0)
    if catch_up == CatchUp.ALL:
        runs = [next_due]
        following = recurrence.after(next_due)
        while following is not None and following <= now and len(runs) < MAX_RUNS_PER_TICK:
            runs.append(following)
            following = recurrence.after(following)
        return Plan(runs, following, 0)
    upcoming = recurrence.upcoming(now)
    if catch_up == CatchUp.ONCE:
        return Plan([next_due], upcoming, _count_between(recurrence, next_due, now) - 1)
    bound = now - dt.timedelta(seconds=grace)
    candidate = next_due if next_due >= bound else recurrence.at_or_after(bound)
    dropped = (
        _count_between(recurrence, next_due, bound - _ONE_MICROSECOND) if next_due < bound else 0
    )
    if candidate is not None and candidate <= now:
        return Plan([candidate], upcoming, dropped)
    return Plan([], upcoming, dropped)


def _count_between(recurrence: Recurrence, first: dt.datetime, now: dt.datetime) -> int:
    """Slots from ``first`` up to ``now``, counted up to :data:`MAX_RUNS_PER_TICK`."""
    count = 0
    slot: dt.datetime | None = first
    while slot is not None and slot <= now and count < MAX_RUNS_PER_TICK:
        count += 1
        slot = recurrence.after(slot)
    return count


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    return value.astimezone(dt.UTC) if value is not None else None
