"""Assignment states and the transitions allowed between them.

An assignment is one (job, client) pair. No transition goes backwards into
the past except the two retries the design names: a lease that runs out
(``sent -> pending``) and a lost or vanished run the job allows to rerun
(``lost``/``acknowledged -> pending``).
"""

from __future__ import annotations

import enum

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
    State.LOST: frozenset(
        {State.PENDING, State.FAILED, State.RUNNING, State.SUCCEEDED, State.TIMED_OUT}
        | {State.CANCELLED, State.EXPIRED}
    ),
}


def allowed(old: State | str, new: State | str) -> bool:
    return State(new) in _ALLOWED.get(State(old), frozenset())
