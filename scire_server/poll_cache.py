"""Which clients are known to have nothing to do: the empty poll without the database.

Almost every poll of a fleet finds nothing. A client becomes *idle* here when
a poll that went to the database found nothing at all for it (nothing to
claim, nothing to reconcile, nothing held by the agent), and stays idle until
"work changed for these clients" is announced for it (``work_due``: a
submission, a schedule's run, a returned lease, a requeue, a retry, a cancel,
here or, through the relay, on another daemon on the same database), until
its earliest pending job that may not start yet comes due, or until the
periodic safety check finds work for it. While a client is idle, its empty
poll is answered from memory.

The race "an announcement arrives while a poll reads the database" is closed
by a generation number: a poll takes it before its transaction, and marks the
client idle only if no announcement for that client came since. A signal that
is missed altogether (a notification lost between daemons) costs at most one
safety-check interval: the check reads the clients with due work (one query on
the pending rows, whatever the history) and forgets them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable

from scire_server.store.records import AgentPresence

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Idle:
    until: dt.datetime | None  # when its first job with a future not_before comes due
    presence: AgentPresence  # what its agent last said of itself, as on record


@dataclasses.dataclass
class IdleCounts:
    """What the cache did since the daemon started (``scire_poll_cache_*_total``)."""

    answered_from_memory: int = 0
    went_to_database: int = 0
    missed_signals: int = 0


class IdleClients:
    """Clients whose next empty poll needs no database, by name."""

    def __init__(self, clock: Callable[[], dt.datetime]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[str, _Idle] = {}
        self._generation = 0
        #: The generation of the last announcement for each client heard since start.
        self._changed_at: dict[str, int] = {}
        self.counts = IdleCounts()

    def generation(self) -> int:
        """Take before reading the database; hand back to :meth:`mark_idle`."""
        with self._lock:
            return self._generation

    def is_idle(self, name: str, presence: AgentPresence) -> bool:
        """True when the client has nothing to do and said nothing new of itself."""
        with self._lock:
            entry = self._idle.get(name)
            if entry is not None and entry.until is not None and self._clock() >= entry.until:
                del self._idle[name]
                entry = None
            if entry is None or not _same(presence, entry.presence):
                return False
            self.counts.answered_from_memory += 1
            return True

    def went_to_database(self) -> None:
        """Count a poll the cache could not answer."""
        with self._lock:
            self.counts.went_to_database += 1

    def mark_idle(
        self, name: str, generation: int, until: dt.datetime | None, presence: AgentPresence
    ) -> bool:
        """The poll that took ``generation`` found nothing for ``name``; False
        when work was announced for it meanwhile (then it stays not idle)."""
        with self._lock:
            if self._changed_at.get(name, -1) > generation:
                return False
            self._idle[name] = _Idle(until, presence)
            return True

    def __call__(self, names: frozenset[str]) -> None:
        """A ``work_due`` subscriber: work changed for these clients."""
        self.forget(names)

    def forget(self, names: Iterable[str]) -> set[str]:
        """These clients may have work; returns those that were idle."""
        with self._lock:
            self._generation += 1
            were_idle = set()
            for name in names:
                self._changed_at[name] = self._generation
                if self._idle.pop(name, None) is not None:
                    were_idle.add(name)
            return were_idle

    def check(self, with_work: set[str]) -> int:
        """The safety check: ``with_work`` are the clients the database says
        have due work; any that was idle here missed its signal. Returns how many."""
        missed = self.forget(with_work)
        for name in sorted(missed):
            log.info(
                "client %s: work found by the poll cache's safety check, not announced",
                name,
            )
        with self._lock:
            self.counts.missed_signals += len(missed)
        return len(missed)

    def snapshot(self) -> dict[str, int]:
        """The counts, and ``idle_clients`` now (``scire_poll_cache_*``)."""
        with self._lock:
            return dataclasses.asdict(self.counts) | {"idle_clients": len(self._idle)}

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)


def _same(said: AgentPresence, known: AgentPresence) -> bool:
    """What the agent says now changes nothing on record (a fact it did not say
    stays as it was)."""
    return all(
        now is None or now == before
        for now, before in (
            (said.version, known.version),
            (said.mode, known.mode),
            (said.callback, known.callback),
        )
    )
