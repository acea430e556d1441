"""One signal inside a server daemon: "work became due for these clients".

Whatever makes work due (a submission, a scheduled run coming due, a lease
returned to pending, start-up recovery) says so here, after its transaction
has committed; whoever cares subscribes. The push to daemon-mode agents is
one subscriber; an empty-poll cache and the relay between daemons are others.
A subscriber must return at once (hand the names to its own thread or queue)
and must not raise: the code that made the work due has already committed it,
and the agent's next poll is the safety net.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

#: Called with the names of clients that have work due.
Subscriber = Callable[[frozenset[str]], None]


class WorkDue:
    """Fan-out of "work became due for these clients" to the subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def announce(self, client_names: Iterable[str]) -> None:
        """Tell every subscriber these clients have work due (no-op for none)."""
        names = frozenset(client_names)
        if not names:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(names)
            except Exception:
                # The work is committed whatever a subscriber does; the poll finds it.
                log.exception(
                    "work-due subscriber %r failed for %d client(s)", subscriber, len(names)
                )
