"""Assignment states and the transitions allowed between them, the statuses of
clients, users and server daemons, and the one-word summary of a job.

An assignment is one (job, client) pair. No transition goes backwards into
the past except the retries the design names: a lease that runs out
(``sent -> pending``), a lost or vanished run the job allows to rerun
(``lost``/``acknowledged -> pending``), and an operator's ``job retry`` of a
host that failed or timed out (``failed``/``timed_out -> pending``).

"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from scire_schema.protocol import ReportedState


class State(enum.StrEnum):
    PENDING = "pending"  #: waiting for its client to poll
    SENT = "sent"  #: in a poll answer, lease running until the ack deadline
    ACKNOWLEDGED = "acknowledged"  #: the agent has it on disk
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"  #: running, but the agent fell silent past the bound
    DENIED = "denied"  #: the ACL refused it at dispatch
    EXPIRED = "expired"
    CANCELLED = "cancelled"


FINAL = frozenset(
    {State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.DENIED, State.EXPIRED, State.CANCELLED}
)
#: The final states ``job retry`` re-queues as a new attempt: the run ended
#: badly on the host (failed, undeliverable, lost and not rerun, timed out).
#: Not ``cancelled`` (an operator's decision), ``denied`` (the ACL's) or
#: ``expired`` (the job's own deadline).
RETRYABLE = frozenset({State.FAILED, State.TIMED_OUT})
#: Final states an agent may report (the wire's reportable states, less ``running``).
REPORTED_FINAL = frozenset(State(s) for s in ReportedState if s != ReportedState.RUNNING)

_ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset(
        {State.SENT, State.DENIED, State.EXPIRED, State.CANCELLED, State.FAILED}
        # an acknowledgement or report from an agent that holds a delivery
        # whose lease had run out before the word arrived
        | {State.ACKNOWLEDGED, State.RUNNING, State.SUCCEEDED, State.TIMED_OUT}
    ),
    State.SENT: frozenset(
        {State.ACKNOWLEDGED, State.PENDING, State.FAILED, State.CANCELLED, State.EXPIRED}
        | {State.RUNNING, State.SUCCEEDED, State.TIMED_OUT}  # report implies the ack
    ),
    State.ACKNOWLEDGED: frozenset(
        {State.RUNNING, State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.CANCELLED}
        | {State.EXPIRED, State.PENDING, State.LOST}
    ),
    State.RUNNING: frozenset(
        {State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.CANCELLED, State.LOST}
    ),
    # An operator's ``job retry`` of a host whose job ended: a new attempt.
    State.FAILED: frozenset({State.PENDING}),
    State.TIMED_OUT: frozenset({State.PENDING}),
    State.LOST: frozenset(
        {State.PENDING, State.FAILED, State.RUNNING, State.SUCCEEDED, State.TIMED_OUT}
        | {State.CANCELLED, State.EXPIRED}
    ),
}


def allowed(old: State | str, new: State | str) -> bool:
    return State(new) in _ALLOWED.get(State(old), frozenset())


class ClientStatus(enum.StrEnum):
    PENDING = "pending"  #: enrollment requested, waiting for an administrator or a token
    ACCEPTED = "accepted"  #: signed; the client may call the agent methods
    REJECTED = "rejected"  #: refused; a new request may replace it
    REVOKED = "revoked"  #: its certificate is refused from the next call on


class UserStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"  #: refused at every call, and its jobs are denied at dispatch


class ScheduleState(enum.StrEnum):
    ACTIVE = "active"  #: makes a run at each slot
    PAUSED = "paused"  #: makes none until resumed; its slots meanwhile are not runs
    FINISHED = "finished"  #: has no slot left (an ``at`` schedule after its run)
    DELETED = "deleted"  #: makes none ever again; kept because its runs name it


class ServerState(enum.StrEnum):
    RUNNING = "running"  #: the daemon is up (or died without saying so: see its heartbeat)
    STOPPED = "stopped"  #: the daemon stopped cleanly
    #: another daemon found its heartbeat stale past ``instance_stale_after`` and took over its leases
    DEAD = "dead"


#: Job summaries that no longer change: the final assignment states, plus
#: ``mixed`` (final assignments in different states) and ``empty`` (none at all).
FINAL_SUMMARIES = frozenset({s.value for s in FINAL} | {"mixed", "empty"})
#: Every word ``job_summary`` can give, in the order an operator reads them.
JOB_SUMMARIES = (*(s.value for s in State), "mixed", "empty")

# The state a job with unfinished assignments is summarized by, most advanced first.
_ACTIVE_ORDER = (State.RUNNING, State.ACKNOWLEDGED, State.SENT, State.LOST, State.PENDING)


def job_summary(states: Mapping[str, int]) -> str:
    """One word for a job from the count of its assignments in each state."""
    active = [s for s in states if State(s) not in FINAL]
    if active:
        for s in _ACTIVE_ORDER:
            if s.value in active:
                return s.value
    if not states:
        return "empty"
    if len(states) == 1:
        return next(iter(states))
    return "mixed"
