"""The plain values the store takes and hands out, so no caller touches an
ORM object after its session has closed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from scire_schema import documents
from scire_server import config

#: The actor of the server's own moves (sweeps, reconcile, dispatch checks).
SERVER = "server"


def actor(kind: str, name: str) -> str:
    """How a client or user is named in the audit trail and the log: ``client:web-17``."""
    return f"{kind}:{name}"


@dataclass(frozen=True)
class Caller:
    """An enrolled client or an active user, as identified by its certificate."""

    kind: str  # "client" | "user"
    id: int
    name: str
    is_admin: bool = False

    @property
    def actor(self) -> str:
        """This caller in the audit trail and the log."""
        return actor(self.kind, self.name)


@dataclass(frozen=True)
class JobSpec:
    """A job definition as submitted; the defaults are the server's."""

    script: str
    name: str = "job"
    interpreter: str = config.DEFAULT_INTERPRETER
    privilege: str = "run"
    priority: int = 0
    timeout: int = config.DEFAULT_TIMEOUT
    output_limit: int = config.DEFAULT_OUTPUT_LIMIT
    max_attempts: int = config.DEFAULT_MAX_ATTEMPTS
    not_before: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    rerun_on_agent_crash: bool = False


@dataclass
class SubmitResult:
    """The new job (or, for a repeated request key, the first one) and which
    targets took it (``refused`` says why not)."""

    job_id: int
    accepted: list[str]
    refused: list[str]
    #: True when the request key named a job submitted before: this is its answer.
    repeated: bool = False


@dataclass
class RetryResult:
    """The hosts ``job retry`` re-queued, and why each other failed host was not."""

    job_id: int
    retried: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


@dataclass
class PollResult:
    """What one poll claimed (job values, rendered by the API after the commit),
    the reconcile answers for the jobs the agent named, and how many were denied."""

    deliveries: list[documents.JobDocument] = field(default_factory=list)
    reconcile: list[dict[str, Any]] = field(default_factory=list)
    denied: int = 0
    #: True when reconcile returned a job of this client to pending (a rerun).
    requeued: bool = False
    #: True when the poll's presence changed the stored version, mode or callback.
    presence_changed: bool = False


@dataclass
class Acknowledged:
    """What an acknowledgement did: the job ids the agent may keep, and of
    those the ones it said it started (now ``running``)."""

    kept: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class AgentPresence:
    """What an agent said of itself in a poll (already checked by the API).
    ``None`` means "not said": that column is left as it is."""

    version: str | None = None
    mode: str | None = None  # protocol.AgentMode
    callback: str | None = None  # host:port, or "" for no listener

    def is_empty(self) -> bool:
        return self.version is None and self.mode is None and self.callback is None


@dataclass(frozen=True)
class PushTarget:
    """Where a daemon-mode agent listens for poll_now, and the certificate it must show."""

    client: str
    callback: str  # host:port
    fingerprint: str  # SHA-256 of the client's certificate, lower-case hex


class Repairs(dict[str, int]):
    """A sweep's counts by what it did (compared and merged as a plain dict),
    and ``due``: the clients it gave pending work again."""

    def __init__(self, counts: dict[str, int], due: frozenset[str] = frozenset()) -> None:
        super().__init__(counts)
        self.due = due


@dataclass(frozen=True)
class Takeover:
    """One daemon this one found dead and took over: its instance key, how
    long its heartbeat had been silent, the leases returned, the audit text."""

    instance_key: str
    silent_for: int  # seconds since its last heartbeat
    leases: Repairs
    detail: str


@dataclass(frozen=True)
class Certificate:
    """A certificate the API signed for a client's request, ready to be stored."""

    csr_pem: str  # the request it answers
    cert_pem: str
    fingerprint: str


@dataclass
class ScheduleResult:
    """A new schedule (or, for a repeated request key, the first one): when it
    runs next, and which of its targets would take a run now (``refused`` says
    why not; each run checks its targets again)."""

    schedule_id: int
    next_due_at: dt.datetime | None
    accepted: list[str]
    refused: list[str]
    repeated: bool = False
