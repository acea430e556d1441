"""Who holds a certificate, remembered between calls.

Every call but enrollment names its caller by the fingerprint of the
certificate it presented, and reading that from the database was more than
half of the server's CPU for an empty poll. :class:`KnownCallers` keeps the
callers that may call (an accepted client, an active user); a refusal is
always read again, so it is recorded each time as itself.

Exactness rests on forgetting: every change of a certificate's standing
(revoke, reject, delete, renewal, a re-enrollment) is made through the API,
which calls :meth:`KnownCallers.forget_all` after its transaction has
committed; with several daemons the relay carries that to the others
(``{"identities": true}`` in its notification), and while the relay does not
listen the others' changes could be missed, so the cache is not used at all
(:attr:`KnownCallers.usable`). A generation number taken before the
database read keeps a read that raced with a change from being remembered,
and an entry is kept at most ``TTL`` seconds whatever happens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from scire_server.store.records import Caller

# Seconds an entry is trusted without a fresh read: a net behind the exact
# forgetting, longer than any poll interval (a shorter one would make every
# poll of a fleet at 60 s read the database again).
TTL = 900.0
MAX_ENTRIES = 100_000  # then the cache starts over (a fleet's agents and users fit)


class KnownCallers:
    """Fingerprint -> the caller it identifies, for callers that may call."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._callers: dict[str, tuple[Caller, float]] = {}
        self._generation = 0
        #: Whether the cache may be used now (the relay sets it: False while
        #: it does not listen for the other daemons' changes).
        self.usable: Callable[[], bool] = lambda: True

    def get(self, fingerprint: str) -> Caller | None:
        if not self.usable():
            return None
        with self._lock:
            entry = self._callers.get(fingerprint)
            if entry is None:
                return None
            caller, stored_at = entry
            if self._clock() - stored_at > TTL:
                del self._callers[fingerprint]
                return None
            return caller

    def generation(self) -> int:
        """Take before reading the database; hand back to :meth:`remember`."""
        with self._lock:
            return self._generation

    def remember(self, fingerprint: str, caller: Caller, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a standing changed while it was read: read it again next time
            if len(self._callers) >= MAX_ENTRIES:
                self._callers.clear()
            self._callers[fingerprint] = (caller, self._clock())

    def forget_all(self) -> None:
        """A certificate's standing changed (here, or on another daemon)."""
        with self._lock:
            self._generation += 1
            self._callers.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._callers)
