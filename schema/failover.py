"""What the agent and ``scire-admin`` share to call one of several servers.

* ``SingleTryTransport``: XML-RPC over TLS that sends a request once. The
  stdlib transport silently sends a request a second time when a kept-alive
  connection turns out dead, whatever the call; here the caller decides,
  because only it knows whether the call may be repeated. It also opens the
  connection on its own (``open``), so a caller can tell "never reached the
  server" (safe to send elsewhere) from "sent, no answer" (may have run).
* ``stale_connection``: the failures that mean a REUSED connection had died
  since the last call (the server restarted or dropped it as idle).
* ``retry_after``: how long a server asked us to wait (HTTP 503 with
  ``Retry-After``, or an ``UNAVAILABLE`` fault ending "retry after N s").
* ``Backoff``: a doubling, bounded, jittered delay, so a fleet whose server
  went away does not come back in lock-step.
"""

from __future__ import annotations

import http.client
import random
import ssl
import xmlrpc.client
from typing import Any

from scire_schema import protocol, tls

#: A wait the server asks for is stretched by up to this fraction, never shortened:
#: agents told "retry after 5 s" together do not all come back in the same instant.
RETRY_AFTER_JITTER = 0.25


class SingleTryTransport(tls.TLSTransport):
    """``tls.TLSTransport`` that never repeats a request by itself."""

    @property
    def connected(self) -> bool:
        """Whether the next request goes over a connection kept from an earlier one."""
        connection: tuple[Any, http.client.HTTPConnection | None] = self._connection  # type: ignore[attr-defined]
        conn = connection[1]
        return conn is not None and conn.sock is not None

    def open(self, host: str) -> None:
        """Connect and shake hands with ``host`` (``HOST:PORT``) unless connected.
        Raises what ``socket``/``ssl`` raise; nothing has been sent when it does."""
        if self.connected:
            return
        conn = self.make_connection(host)
        try:
            conn.connect()
        except BaseException:
            self.close()
            raise

    def request(self, host: Any, handler: str, request_body: Any, verbose: bool = False) -> Any:
        # ``single_request`` closes the connection itself after any failure but a fault.
        return self.single_request(host, handler, request_body, verbose)


def stale_connection(exc: BaseException) -> bool:
    """Whether ``exc``, raised on a connection kept from an earlier call, says
    the server closed it meanwhile (rather than that the server is down or slow):
    a reset, a close before any answer, a garbled status line, an EOF in TLS."""
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return True
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True
    return isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait before calling again, or None when
    ``exc`` is no such request: an HTTP 503 with ``Retry-After`` (the listener's
    queue is full) or an ``UNAVAILABLE`` fault whose text ends "retry after N s"."""
    if isinstance(exc, xmlrpc.client.ProtocolError) and exc.errcode == 503:
        # ``xmlrpc.client`` hands the headers over as a plain dict: match names as HTTP does.
        wanted = protocol.RETRY_AFTER_HEADER.lower()
        for name, value in dict(exc.headers or {}).items():
            if str(name).lower() == wanted and isinstance(value, str):
                return protocol.parse_retry_after(value)
        return None
    if (
        isinstance(exc, xmlrpc.client.Fault)
        and exc.faultCode == protocol.FaultCode.UNAVAILABLE
        and isinstance(exc.faultString, str)
    ):
        return protocol.parse_retry_after(exc.faultString)
    return None


def stretch(seconds: float, rng: random.Random | None = None) -> float:
    """``seconds`` plus up to ``RETRY_AFTER_JITTER`` of it: a server's "retry
    after" is a floor, and the jitter spreads the callers it told the same."""
    return seconds * (rng or random).uniform(1.0, 1.0 + RETRY_AFTER_JITTER)


class Backoff:
    """Waits that double from ``first`` up to ``most`` seconds, each drawn from
    the upper half of its step (``[d/2, d]``): never longer than ``most``, never
    zero, and different for each caller."""

    def __init__(self, first: float, most: float, rng: random.Random | None = None) -> None:
        if not 0 < first <= most:
            raise ValueError(f"backoff from {first} to {most} s: need 0 < first <= most")
        self.first = first
        self.most = most
        self._rng = rng or random.Random()
        self._step = 0.0

    @property
    def active(self) -> bool:
        """Whether a failure since the last ``reset`` is being backed off from."""
        return self._step > 0

    def next(self) -> float:
        """The wait before the next try, after one more failure."""
        self._step = self.first if self._step == 0 else min(self._step * 2, self.most)
        return self._rng.uniform(self._step / 2, self._step)

    def reset(self) -> None:
        """A try succeeded: the next failure starts from ``first`` again."""
        self._step = 0.0
