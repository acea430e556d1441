"""One signal inside a server daemon: "work became due for these clients"
(more generally: "work changed for these clients", a cancel included).

Whatever makes work due (a submission, a scheduled run coming due, a lease
returned to pending, start-up recovery) says so here, after its transaction
has committed; whoever cares subscribes. The push to daemon-mode agents is
one subscriber; an empty-poll cache and the relay between daemons are others.
An announcement is *local* (made by this daemon) or *relayed* (made by
another daemon on the same database, heard through ``relay``). A subscriber
that acts for the daemon that made the change (the relay itself, which must
not echo, and the pusher: the origin pushes) subscribes with
``relayed=False``; one that keeps knowledge about due work (a cache) hears
both. A subscriber must return at once (hand the names to its own thread or queue)
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
        self._subscribers: list[tuple[Subscriber, bool]] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber, relayed: bool = True) -> None:
        """Hear every announcement; with ``relayed=False`` only this daemon's own."""
        with self._lock:
            self._subscribers.append((subscriber, relayed))

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = [(s, r) for s, r in self._subscribers if s != subscriber]

    def announce(self, client_names: Iterable[str], relayed: bool = False) -> None:
        """Tell the subscribers these clients have work due (no-op for none);
        ``relayed``: another daemon made the change."""
        names = frozenset(client_names)
        if not names:
            return
        with self._lock:
            subscribers = [
                s for s, hears_relayed in self._subscribers if hears_relayed or not relayed
            ]
        for subscriber in subscribers:
            try:
                subscriber(names)
            except Exception:
                # The work is committed whatever a subscriber does; the poll finds it.
                log.exception(
                    "work-due subscriber %r failed for %d client(s)", subscriber, len(names)
                )
