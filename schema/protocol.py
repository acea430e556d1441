"""The words of the wire, typed once for both programs.

Fault codes, the statuses and actions the agent API answers with, the states
a status report may carry and the time format of every document and answer.
Members are ``StrEnum``/``IntEnum``, so they compare equal to the plain
values the wire carries; ``xmlrpc.client`` cannot marshal enum members, so a
sender passes ``.value``. See docs/PROTOCOL.md for what each means.
"""

from __future__ import annotations

import datetime as dt
import enum
import re

#: An agent's default jitter: each wait between polls is the poll interval times a
#: random factor in [1 - j, 1 + j]. The server keeps idle connections open longer
#: than the interval it suggests times (1 + j).
POLL_JITTER = 0.1


class FaultCode(enum.IntEnum):
    """The XML-RPC fault codes a server answers with."""

    AUTHENTICATION_REQUIRED = 1  #: no or unknown client certificate
    FORBIDDEN = 2  #: known caller, not allowed (revoked, not admin, wrong namespace)
    NOT_FOUND = 3
    INVALID_ARGUMENT = 4
    INVALID_DOCUMENT = 5  #: malformed, hostile or schema-invalid XML
    NOT_HELD = 6  #: report on an assignment the caller does not hold
    ILLEGAL_TRANSITION = 7
    CONFLICT = 8  #: the thing exists already
    ENROLLMENT_REFUSED = 9
    UNAVAILABLE = 10  #: try again later (database busy, shutting down)
    INSTANCE_CONFLICT = 11  #: another live daemon holds this instance key
    MALFORMED_REQUEST = 12  #: the XML-RPC request body cannot be parsed
    INTERNAL = 99


#: Faults after which the same call can never succeed, on this server or another:
#: the agent drops what it sent instead of retrying or failing over.
#: ``MALFORMED_REQUEST`` is one: the agent would send the same bytes again.
PERMANENT_FAULTS = frozenset(
    {
        FaultCode.AUTHENTICATION_REQUIRED,
        FaultCode.FORBIDDEN,
        FaultCode.NOT_FOUND,
        FaultCode.INVALID_ARGUMENT,
        FaultCode.INVALID_DOCUMENT,
        FaultCode.NOT_HELD,
        FaultCode.ILLEGAL_TRANSITION,
        FaultCode.CONFLICT,
        FaultCode.ENROLLMENT_REFUSED,
        FaultCode.MALFORMED_REQUEST,
    }
)


class EnrollmentStatus(enum.StrEnum):
    """A client's enrollment, as ``agent.register`` and ``agent.fetch_certificate`` answer it."""

    PENDING = "pending"  #: waits for an administrator
    ACCEPTED = "accepted"  #: signed; the certificate is ready
    REJECTED = "rejected"
    REVOKED = "revoked"


#: Statuses after which a request never becomes accepted.
REFUSED_STATUSES = frozenset({EnrollmentStatus.REJECTED, EnrollmentStatus.REVOKED})


class ReconcileAction(enum.StrEnum):
    """What the server says of a job the agent named in a poll."""

    CANCELLED = "cancelled"  #: do not run it; stop it if it runs
    EXPIRED = "expired"  #: do not start it
    UNKNOWN = "unknown"  #: the server has no live assignment of it for this agent


class ReportResult(enum.StrEnum):
    """What ``agent.report`` did with a status report."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  #: the same outcome was recorded already
    IGNORED = "ignored"  #: late for cancelled or expired work; recorded, not applied


class ReportedState(enum.StrEnum):
    """The states a status report may carry (the enumeration in ``status.xsd``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class AgentMode(enum.StrEnum):
    """How an agent runs, as it says in the ``presence`` of each poll."""

    ONCE = "once"  #: ``scire-client run`` from cron or by hand: one pass, then exit
    DAEMON = "daemon"  #: ``scire-client daemon``: polls on its own, may listen for poll_now


#: ``presence`` key of a poll the agent makes because the server's ``poll_now``
#: woke it: the server then reads the database, whatever it knows in memory
#: (another daemon may have made the work due a moment before it heard of it).
WOKEN = "woken"

#: Status reports ``agent.report_many`` takes in one call; an agent sends its
#: pending reports in chunks of at most this many.
REPORTS_PER_CALL_MAX = 100


class ScheduleKind(enum.StrEnum):
    """How ``admin.job_submit`` makes a schedule instead of a job (its ``at``,
    ``every`` or ``cron`` key), and the ``kind`` of a schedule."""

    AT = "at"  #: one run at a time
    EVERY = "every"  #: a run every fixed duration, the first at once
    CRON = "cron"  #: a run at each time a five-field cron expression names


class CatchUp(enum.StrEnum):
    """What a schedule does with the slots it missed while no daemon ran it."""

    ONCE = "once"  #: one run for all the missed slots
    ALL = "all"  #: one run per missed slot
    SKIP = "skip"  #: none; a slot later than the grace is dropped


#: The one method of a daemon-mode agent's listener. It takes no arguments and
#: answers ``True``; only a caller with a *server* certificate from the CA may call it.
POLL_NOW_METHOD = "poll_now"

#: The organizational unit (OU) of the subject that says what a certificate is for.
#: The database decides who a caller is; the role decides what it may be at all.
ROLE_SERVER = "scire-server"
ROLE_CLIENT = "scire-client"
ROLE_USER = "scire-user"


#: How a server says when to call again: the ``Retry-After`` header of an HTTP 503
#: (the listener's queue is full) and the tail of an ``UNAVAILABLE`` fault's text
#: ("database unavailable: ...; retry after 5 s"). Not an error to the agent: it
#: waits that long (with jitter), on this server or, when it has others, elsewhere.
RETRY_AFTER_HEADER = "Retry-After"
_RETRY_AFTER_TEXT = re.compile(r"retry after (\d+(?:\.\d+)?) s\b")


def retry_after_text(seconds: float) -> str:
    """The words an ``UNAVAILABLE`` fault ends with to ask for a pause."""
    return f"retry after {seconds:g} s"


def parse_retry_after(text: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value or a fault's text
    (``retry_after_text``); None when it asks for none. Bounded to one hour so a
    hostile or broken server cannot park an agent for ever."""
    if not text:
        return None
    text = text.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        found = _RETRY_AFTER_TEXT.search(text)
        if found is None:
            return None
        seconds = float(found.group(1))
    return min(seconds, 3600.0)


def utc_now() -> dt.datetime:
    """The current time, aware, in UTC: what every party stamps."""
    return dt.datetime.now(dt.UTC)


def format_time(value: dt.datetime) -> str:
    """UTC, ISO 8601 with a Z. Naive datetimes are taken as UTC (the store keeps UTC)."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> dt.datetime:
    """The inverse of ``format_time``: a naive UTC datetime. ValueError when it is not one,
    also for a time XML Schema allows but ``datetime`` cannot hold (24:00:00, year 10000)."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
    except OverflowError as exc:
        raise ValueError(f"time {text.strip()[:40]!r} is out of range") from exc
    return value
