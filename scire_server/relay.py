"""The "work changed for these clients" signal between daemons on one
PostgreSQL (``LISTEN/NOTIFY``; SQLite has one daemon and no relay).

Outgoing: the relay subscribes to this daemon's own announcements
(``relayed=False``, so what it hears from the others is never sent back) and
a sender thread ``NOTIFY``s them on ``store.signals.WORK_CHANGED``: a JSON
payload ``{"from": <sender>, "clients": [...]}``, split into as many
notifications as PostgreSQL's payload limit needs, all in one transaction.
The announcement comes after the change committed, so a daemon that hears it
finds the change.

Incoming: a listener thread on a connection of its own re-announces the names
it receives as relayed (``WorkDue.announce(..., relayed=True)``), and skips
its own notifications (``from`` is this relay's sender id: the instance key
and a per-process nonce). When the connection fails it logs one line, tries
again with backoff, logs one line when it is back, and then announces every
client with due work: a notification sent meanwhile was lost.

Certificates: a change of a certificate's standing made here (a revocation,
a renewal...) goes out as ``{"from": <sender>, "clients": [], "identities":
true}``, and one heard from another daemon makes this one forget the callers
it knows (``identities.KnownCallers``). The relay says whether it listens
(:attr:`Relay.listening`): while it does not, that cache is not used, and when
it listens again the cache is emptied, since a change may have been missed.

Who pushes: the daemon where the change happened. It has every agent's
callback address from the shared database, and an agent's listener accepts
any daemon's certificate; the pusher hears local announcements only, so an
agent is pushed once per change however many daemons run.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterable

from scire_server.exceptions import ScireError
from scire_server.store import Store
from scire_server.store.signals import MAX_PAYLOAD, WORK_CHANGED, Listening
from scire_server.work_due import WorkDue

log = logging.getLogger(__name__)

LISTEN_TICK = 0.5  # seconds the listener waits for notifications before checking for a stop
RECONNECT_FIRST = 0.5  # seconds before the first reconnection attempt
RECONNECT_MAX = 10.0  # the backoff's ceiling


def encode(sender: str, names: Iterable[str], limit: int = MAX_PAYLOAD) -> list[str]:
    """The payloads that carry ``names``, each under ``limit`` bytes."""
    payloads: list[str] = []
    batch: list[str] = []
    for name in sorted(names):
        candidate = json.dumps({"from": sender, "clients": [*batch, name]})
        if batch and len(candidate.encode()) > limit:
            payloads.append(json.dumps({"from": sender, "clients": batch}))
            batch = [name]
        else:
            batch.append(name)
    if batch:
        payloads.append(json.dumps({"from": sender, "clients": batch}))
    return payloads


IDENTITIES = "identities"  # the payload key: a certificate's standing changed


def encode_identities_changed(sender: str) -> str:
    return json.dumps({"from": sender, "clients": [], IDENTITIES: True})


def identities_changed(payload: str) -> bool:
    """Whether a (decodable) payload says a certificate's standing changed."""
    message = json.loads(payload)
    return isinstance(message, dict) and message.get(IDENTITIES) is True


def decode(payload: str) -> tuple[str, frozenset[str]]:
    """The sender and client names of one payload; ``ValueError`` for anything else."""
    try:
        message = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    sender, clients = message.get("from"), message.get("clients")
    if not isinstance(sender, str) or not isinstance(clients, list):
        raise ValueError('needs "from" (a string) and "clients" (a list)')
    if not all(isinstance(c, str) for c in clients):
        raise ValueError("client names must be strings")
    return sender, frozenset(clients)


class Relay:
    """Carries this daemon's announcements to the other daemons and theirs to
    this one; see the module docstring."""

    def __init__(
        self,
        store: Store,
        work_due: WorkDue,
        instance_key: str,
        on_identities_changed: Callable[[], None] | None = None,
    ) -> None:
        """``on_identities_changed``: another daemon changed a certificate's
        standing, or a change may have been missed (this daemon forgets its callers)."""
        self.store = store
        self.work_due = work_due
        self.on_identities_changed = on_identities_changed
        self.sender = f"{instance_key}/{uuid.uuid4().hex[:12]}"
        #: True while the listener listens: then no change of another daemon is missed.
        self.listening = False
        self._outgoing: queue.SimpleQueue[frozenset[str] | str | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._listening: Listening | None = None
        self._ready = threading.Event()
        self._threads = [
            threading.Thread(target=self._send_loop, name="relay-send", daemon=True),
            threading.Thread(target=self._listen_loop, name="relay-listen", daemon=True),
        ]

    def start(self, ready_timeout: float = 10.0) -> bool:
        """Start both threads; whether the listener was listening within
        ``ready_timeout`` (it keeps trying either way)."""
        self.work_due.subscribe(self, relayed=False)
        for thread in self._threads:
            thread.start()
        return self._ready.wait(ready_timeout)

    def __call__(self, names: frozenset[str]) -> None:
        """A local announcement: queue it for the sender thread."""
        self._outgoing.put(names)

    def identities_changed(self) -> None:
        """This daemon changed a certificate's standing (committed): tell the
        others now, before the call that made the change is answered, so an
        operator's ``client revoke`` has reached every daemon when it returns
        (queued for the sender thread only when the database does not answer)."""
        try:
            self.store.signals.notify(WORK_CHANGED, [encode_identities_changed(self.sender)])
        except ScireError as exc:
            log.warning("relay: the other daemons not told of a revocation yet: %s", exc.message)
            self._outgoing.put(IDENTITIES)

    def close(self) -> None:
        """Stop listening and sending; what is still queued is sent first."""
        self.work_due.unsubscribe(self)
        self._stop.set()
        self._outgoing.put(None)
        for thread in self._threads:
            thread.join(30)

    # --- sending --------------------------------------------------------------

    def _send_loop(self) -> None:
        failing = False
        while True:
            queued = [self._outgoing.get()]
            # Everything queued meanwhile goes in the same transaction.
            while True:
                try:
                    queued.append(self._outgoing.get_nowait())
                except queue.Empty:
                    break
            stopping = None in queued
            names: set[str] = set()
            for item in queued:
                if isinstance(item, frozenset):
                    names |= item
            payloads = encode(self.sender, names)
            if IDENTITIES in queued:
                payloads.append(encode_identities_changed(self.sender))
            if payloads:
                try:
                    self.store.signals.notify(WORK_CHANGED, payloads)
                    if failing:
                        log.info("relay: notifying the other daemons again")
                    failing = False
                except ScireError as exc:
                    # The change is committed; the other daemons' agents find it
                    # at their next poll.
                    if not failing:
                        log.warning(
                            "relay: the other daemons were not told of %d client(s): %s",
                            len(names),
                            exc.message,
                        )
                    failing = True
            if stopping:
                return

    # --- listening ------------------------------------------------------------

    def _listen_loop(self) -> None:
        delay = RECONNECT_FIRST
        outage: str | None = None
        first = True
        while not self._stop.is_set():
            try:
                self._listening = self.store.signals.listen(WORK_CHANGED)
            except ScireError as exc:
                if outage is None:
                    outage = exc.message
                    log.warning(
                        "relay: cannot listen for the other daemons: %s; retrying", exc.message
                    )
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_FIRST
            self.listening = True
            if not first and self.on_identities_changed is not None:
                self.on_identities_changed()  # a change may have come while deaf
            self._ready.set()
            if outage is not None or not first:
                log.info("relay: listening for the other daemons again")
                self._catch_up()
            outage, first = None, False
            try:
                self._receive(self._listening)
            except ScireError as exc:
                if self._stop.is_set():
                    break
                outage = exc.message
                log.warning("relay: lost the connection it listens on: %s; retrying", exc.message)
            finally:
                self.listening = False
                self._listening.close()
                self._listening = None

    def _receive(self, listening: Listening) -> None:
        while not self._stop.is_set():
            names: set[str] = set()
            for payload in listening.wait(LISTEN_TICK):
                try:
                    sender, clients = decode(payload)
                except ValueError as exc:
                    log.warning("relay: ignored a notification on %s: %s", WORK_CHANGED, exc)
                    continue
                if sender != self.sender:
                    names |= clients
                    if identities_changed(payload) and self.on_identities_changed is not None:
                        self.on_identities_changed()
            self.work_due.announce(names, relayed=True)

    def _catch_up(self) -> None:
        """After a reconnection: a notification may have been missed meanwhile."""
        try:
            names = self.store.sweeps.clients_with_due_work()
        except ScireError as exc:
            log.warning("relay: due work not re-announced after reconnecting: %s", exc.message)
            return
        self.work_due.announce(names, relayed=True)
