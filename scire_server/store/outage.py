"""A database outage as the daemon sees it: one warning when it starts, one
when it ends, and a count of the calls answered ``Unavailable`` meanwhile.

Every transaction reports here (:meth:`Outage.failed` with the driver's
words, :meth:`Outage.answered` after any success), so a 20-second outage
under load costs the log two lines instead of two tracebacks per call.
"""

from __future__ import annotations

import logging
import threading
import time

from scire_schema.protocol import retry_after_text
from scire_server.exceptions import DatabaseUnreachable

log = logging.getLogger("scire_server.store")

# Seconds a caller is asked to wait during an outage: long enough not to hammer
# a restarting database, short enough that a failover of a few seconds costs
# an agent one retry.
OUTAGE_RETRY_AFTER = 5


class Outage:
    """Whether the database answers, from this daemon's point of view."""

    def __init__(self, where: str) -> None:
        self.where = where  # the database, password hidden
        self._lock = threading.Lock()
        self._since: float | None = None
        self._refused = 0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, reason: str) -> DatabaseUnreachable:
        """Note a transaction the database did not answer (``reason``: the
        driver's first line, password already hidden); the error for the caller."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                self._refused = 0
                log.warning(
                    "database unreachable: %s (%s); answering Unavailable until it is back",
                    reason,
                    self.where,
                )
            self._refused += 1
        return DatabaseUnreachable(
            f"database unavailable: {reason}; {retry_after_text(OUTAGE_RETRY_AFTER)}"
        )

    def answered(self) -> None:
        """Note a transaction the database answered; ends an outage."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._since is None:
                return
            lasted = time.monotonic() - self._since
            refused = self._refused
            self._since = None
            self._refused = 0
        log.warning(
            "database reachable again after %.1f s; %d calls answered Unavailable",
            lasted,
            refused,
        )
