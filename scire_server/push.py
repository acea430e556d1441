"""The push: ``poll_now`` to daemon-mode agents when work becomes due for them.

A :class:`Pusher` subscribes to the daemon's :class:`work_due.WorkDue`. An
announcement returns at once: the names go to a bounded pool of
``push_workers`` threads, which look up where each agent listens (the store's
``push_targets``, cached) and call ``poll_now()`` over mutual TLS with a
deadline of ``push_timeout`` for the whole exchange. Only a client whose agent
last said it runs in daemon mode with a callback address is pushed to.

Pushes are coalesced per agent: a push waiting for a worker absorbs every
further announcement for that agent; one in flight absorbs them into at most
one follow-up push (the work may have been committed after the agent's poll
began). The agent coalesces hints of its own, and its poll is the safety net:
a failed push is one log line and a counter, never an error for whoever made
the work due.

TLS: the server presents its own certificate (role ``scire-server``, which the
agent's listener requires) and verifies that the agent's comes from the CA.
An agent has no host name to check (agents move), so instead its
certificate's fingerprint must be the one on record for that client.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import selectors
import socket
import ssl
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.parsers.expat import ExpatError

from scire_schema import certs, protocol, tls, tls_errors
from scire_server.config import ServerConfig
from scire_server.exceptions import InvalidArgument, ScireError
from scire_server.presence import LastSeen, split_callback
from scire_server.store import PushTarget, Store, utcnow

log = logging.getLogger(__name__)

TARGET_TTL = 30.0  # seconds a looked-up callback address (or its absence) is trusted
MAX_ANSWER_BYTES = 64 * 1024  # of an agent's answer to poll_now, headers included


class PushFailed(Exception):
    """A push that did not get ``True`` back; the message says why, in words."""


class _Slot(enum.Enum):
    QUEUED = "queued"  # waiting for a worker
    IN_FLIGHT = "in flight"
    IN_FLIGHT_AGAIN = "in flight, one more queued"


@dataclasses.dataclass
class PushCounters:
    """What the pusher did since start, for logs and metrics (:meth:`snapshot`)."""

    announced: int = 0  #: client names heard from the work-due signal
    no_target: int = 0  #: of those, not daemon-mode or without a callback address
    follow_ups: int = 0  #: announcements during a push in flight, kept as its one follow-up
    coalesced: int = 0  #: announcements absorbed by a push already queued or followed up
    sent: int = 0  #: pushes started
    succeeded: int = 0  #: the agent answered True
    failed: int = 0  #: anything else (refused, timed out, wrong certificate, fault)
    dropped: int = 0  #: queued pushes dropped at shutdown
    lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, **amounts: int) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                field.name: getattr(self, field.name)
                for field in dataclasses.fields(self)
                if field.name != "lock"
            }


def push_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The pusher's TLS context: the server's certificate as the client
    certificate, the agent's verified against the CA, no host name check (the
    fingerprint on record is checked instead, after the handshake)."""
    context = tls.client_context(ca_file, cert_file, key_file)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class Pusher:
    """Sends ``poll_now`` to the agents work became due for; see the module docstring."""

    def __init__(
        self,
        store: Store,
        context: ssl.SSLContext,
        *,
        workers: int,
        timeout: float,
        server_name: str,
        last_seen: LastSeen | None = None,
        target_ttl: float = TARGET_TTL,
    ) -> None:
        self.store = store
        self.context = context
        self.timeout = timeout
        self.server_name = server_name
        self.last_seen = last_seen
        self.target_ttl = target_ttl
        self.counters = PushCounters()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="push")
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._targets: dict[str, tuple[float, PushTarget | None]] = {}
        self._closed = False

    @classmethod
    def from_config(
        cls, config: ServerConfig, store: Store, last_seen: LastSeen | None = None
    ) -> Pusher:
        return cls(
            store,
            push_context(config.cert_file, config.key_file, config.ca_cert_file),
            workers=config.push_workers,
            timeout=config.push_timeout,
            server_name=config.instance_key,
            last_seen=last_seen,
        )

    # --- the work-due subscriber ------------------------------------------------

    def __call__(self, names: frozenset[str]) -> None:
        """Work became due for ``names``: look them up and push, in the pool."""
        self.counters.add(announced=len(names))
        self._submit(self._dispatch, names)

    def forget(self, name: str) -> None:
        """The agent changed its mode or callback: look it up again next time."""
        with self._lock:
            self._targets.pop(name, None)

    def close(self) -> None:
        """Stop: queued pushes are dropped, pushes in flight end within the timeout."""
        with self._lock:
            self._closed = True
            dropped = sum(1 for slot in self._slots.values() if slot is not _Slot.IN_FLIGHT)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if dropped:
            self.counters.add(dropped=dropped)
        log.info("pusher stopped: %s", _words(self.counters.snapshot()))

    # --- in the pool ------------------------------------------------------------------

    def _submit(self, function: Callable[..., None], *args: object) -> bool:
        with self._lock:
            if self._closed:
                return False
            try:
                self._pool.submit(function, *args)
            except RuntimeError:  # the pool shut down between the check and here
                return False
            return True

    def _dispatch(self, names: frozenset[str]) -> None:
        try:
            targets = self._resolve(names)
        except ScireError as exc:
            log.warning("push to %d client(s) skipped: %s", len(names), exc.message)
            self.counters.add(failed=len(names))
            return
        absent = sum(1 for target in targets.values() if target is None)
        coalesced = follow_ups = 0
        for target in targets.values():
            if target is None:
                continue
            with self._lock:
                slot = self._slots.get(target.client)
                if slot is None:
                    self._slots[target.client] = _Slot.QUEUED
                elif slot is _Slot.IN_FLIGHT:
                    self._slots[target.client] = _Slot.IN_FLIGHT_AGAIN
                    follow_ups += 1
                    continue
                else:
                    coalesced += 1
                    continue
            if not self._submit(self._push, target):
                self._release(target.client)
        self.counters.add(no_target=absent, coalesced=coalesced, follow_ups=follow_ups)

    def _resolve(self, names: Iterable[str]) -> dict[str, PushTarget | None]:
        now = time.monotonic()
        found: dict[str, PushTarget | None] = {}
        missing: list[str] = []
        with self._lock:
            for name in names:
                cached = self._targets.get(name)
                if cached is not None and cached[0] > now:
                    found[name] = cached[1]
                else:
                    missing.append(name)
        if missing:
            looked_up = self.store.directory.push_targets(missing)
            with self._lock:
                for name, target in looked_up.items():
                    self._targets[name] = (now + self.target_ttl, target)
            found.update(looked_up)
        return found

    def _push(self, target: PushTarget) -> None:
        with self._lock:
            self._slots[target.client] = _Slot.IN_FLIGHT
        self.counters.add(sent=1)
        try:
            poll_now(self.context, target, self.timeout)
        except PushFailed as exc:
            self.counters.add(failed=1)
            self.forget(target.client)
            log.warning(
                "push from %s to client %s at %s failed: %s; it gets its work at its next poll",
                self.server_name,
                target.client,
                target.callback,
                exc,
            )
        except Exception:
            self.counters.add(failed=1)
            log.exception("push to client %s at %s failed", target.client, target.callback)
        else:
            self.counters.add(succeeded=1)
            if self.last_seen is not None:
                self.last_seen.note(target.client, utcnow())
            log.debug("push to client %s at %s: poll_now answered", target.client, target.callback)
        finally:
            with self._lock:
                again = self._slots.get(target.client) is _Slot.IN_FLIGHT_AGAIN
                if again:
                    self._slots[target.client] = _Slot.QUEUED
            if not again or not self._submit(self._push, target):
                self._release(target.client)

    def _release(self, name: str) -> None:
        with self._lock:
            self._slots.pop(name, None)


def _words(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}={value}" for name, value in counts.items())


# --- one push: connect, handshake, check the fingerprint, call, read the answer --------


def poll_now(context: ssl.SSLContext, target: PushTarget, timeout: float) -> None:
    """Call ``poll_now()`` on the agent at ``target.callback``; everything within
    ``timeout`` seconds. Returns when the agent answered ``True``; raises
    :class:`PushFailed` saying why otherwise."""
    try:
        host, port = split_callback(target.callback)
    except InvalidArgument as exc:
        raise PushFailed(f"the stored callback address is not valid: {exc.message}") from None
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise PushFailed(f"nothing listens on {where} (connection refused)") from None
    except TimeoutError:
        raise PushFailed(f"no connection to {where} within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise PushFailed(f"cannot resolve {host}: {exc.strerror}") from None
    except OSError as exc:
        raise PushFailed(f"cannot reach {where}: {exc.strerror or exc}") from None
    try:
        sock.setblocking(False)
        stream = context.wrap_socket(sock, do_handshake_on_connect=False)
        _handshake(stream, deadline, where, timeout)
        presented = stream.getpeercert(binary_form=True)
        if presented is None or certs.fingerprint(presented) != target.fingerprint:
            shown = certs.fingerprint(presented) if presented else "none"
            raise PushFailed(
                f"the agent at {where} presented certificate {shown}, not the one on record "
                f"for {target.client} ({target.fingerprint}); another host holds that address, "
                "or the client re-enrolled without polling since"
            )
        body = xmlrpc.client.dumps((), protocol.POLL_NOW_METHOD).encode("utf-8")
        head = (
            f"POST / HTTP/1.1\r\nHost: {where}\r\nUser-Agent: scire-server\r\n"
            f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        _send(stream, head + body, deadline, where, timeout)
        status, answer = _read_answer(stream, deadline, where, timeout)
    except ssl.SSLError as exc:
        raise PushFailed(tls_errors.explain_for_pusher(exc, where)) from None
    except (ConnectionResetError, BrokenPipeError):
        raise PushFailed(f"the agent at {where} closed the connection") from None
    except OSError as exc:
        if exc.errno == errno.ECONNRESET:
            raise PushFailed(f"the agent at {where} reset the connection") from None
        raise PushFailed(f"talking to {where} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    _check_answer(status, answer, where)


def _wait(stream: ssl.SSLSocket, events: int, deadline: float, where: str, timeout: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PushFailed(f"the agent at {where} did not answer within {timeout:g} s")
    with selectors.DefaultSelector() as selector:
        selector.register(stream, events)
        if not selector.select(left):
            raise PushFailed(f"the agent at {where} did not answer within {timeout:g} s")


def _handshake(stream: ssl.SSLSocket, deadline: float, where: str, timeout: float) -> None:
    while True:
        try:
            stream.do_handshake()
            return
        except ssl.SSLWantReadError:
            _wait(stream, selectors.EVENT_READ, deadline, where, timeout)
        except ssl.SSLWantWriteError:
            _wait(stream, selectors.EVENT_WRITE, deadline, where, timeout)


def _send(stream: ssl.SSLSocket, data: bytes, deadline: float, where: str, timeout: float) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = stream.send(view)
        except (ssl.SSLWantWriteError, BlockingIOError):
            _wait(stream, selectors.EVENT_WRITE, deadline, where, timeout)
            continue
        except ssl.SSLWantReadError:
            _wait(stream, selectors.EVENT_READ, deadline, where, timeout)
            continue
        view = view[sent:]


def _read_answer(
    stream: ssl.SSLSocket, deadline: float, where: str, timeout: float
) -> tuple[int, bytes]:
    """The HTTP status and body of the answer, read up to its Content-Length
    (or the end of the connection), at most ``MAX_ANSWER_BYTES`` in all."""
    data = bytearray()
    wanted: int | None = None
    while wanted is None or len(data) < wanted:
        try:
            chunk = stream.recv(16 * 1024)
        except (ssl.SSLWantReadError, BlockingIOError):
            _wait(stream, selectors.EVENT_READ, deadline, where, timeout)
            continue
        except ssl.SSLWantWriteError:
            _wait(stream, selectors.EVENT_WRITE, deadline, where, timeout)
            continue
        except ssl.SSLZeroReturnError:
            chunk = b""
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_ANSWER_BYTES:
            raise PushFailed(f"the agent at {where} answered more than {MAX_ANSWER_BYTES} bytes")
        if wanted is None and b"\r\n\r\n" in data:
            end = data.index(b"\r\n\r\n")
            length = _content_length(bytes(data[:end]), where)
            if length is not None:
                wanted = end + 4 + length
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise PushFailed(f"the agent at {where} closed the connection before answering")
    head = bytes(data[:end])
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise PushFailed(f"the agent at {where} did not answer in HTTP: {status_line[:60]!r}")
    body = bytes(data[end + 4 :])
    length = _content_length(head, where)
    if length is not None:
        if len(body) < length:
            raise PushFailed(f"the agent at {where} closed the connection mid-answer")
        body = body[:length]
    return int(parts[1]), body


def _content_length(head: bytes, where: str) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            text = value.strip()
            if not text.isdigit():
                raise PushFailed(f"the agent at {where} sent a bad Content-Length")
            return int(text)
    return None


def _check_answer(status: int, body: bytes, where: str) -> None:
    if status != 200:
        raise PushFailed(f"the agent at {where} answered HTTP {status}")
    if b"<!" in body:
        # An answer needs no DOCTYPE or entities; expat is not asked to expand any.
        raise PushFailed(f"the agent at {where} answered with a document type declaration")
    try:
        (result,), _ = xmlrpc.client.loads(body)
    except xmlrpc.client.Fault as fault:
        raise PushFailed(
            f"the agent at {where} refused poll_now: fault {fault.faultCode}: "
            f"{str(fault.faultString)[:200]}"
        ) from None
    except (ExpatError, ValueError, TypeError, xmlrpc.client.ResponseError) as exc:
        raise PushFailed(
            f"the agent at {where} did not answer in XML-RPC: {str(exc)[:100]}"
        ) from None
    if result is not True:
        raise PushFailed(f"the agent at {where} answered {str(result)[:60]!r}, not True")
