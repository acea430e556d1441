"""A TLS HTTP/1.1 front end whose worker threads only ever see complete requests.

Why: a listener that does the TLS handshake and waits for the request line
inside a pool thread can be frozen by anyone who opens as many idle
connections as there are threads. Here one event loop (its own thread, stdlib
``asyncio`` streams and ``ssl``) owns every socket: it accepts plain TCP,
checks the connection caps, only then starts TLS (so a refused peer costs no
handshake), and reads each request under deadlines. TLS runs through
``ssl.SSLObject`` over the plain stream rather than ``start_tls``, whose
transport keeps a 256 KiB buffer per connection. A bounded
``ThreadPoolExecutor`` receives a parsed, size-bounded :class:`Request` and
returns a :class:`Response`. An idle keep-alive connection costs a few
kilobytes of memory, never a thread.

Every connection lives under three deadlines (handshake, idle keep-alive,
whole request: headers and body together, not per read, so a one-byte-a-second
drip is cut), plus a write deadline for the answer. Caps: connections per peer
address and in total (at the total, the connection idle the longest is closed
to make room; with none idle the newcomer is refused), header and body size
(``413`` before any ``100 Continue``; no chunked bodies: ``411``), and the pool
queue (full: ``503`` with ``Retry-After``).

Both programs use it: the server's XML-RPC port and the daemon-mode agent's
``poll_now`` endpoint. It imports nothing from ``scire_server`` or
``scire_client``.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import http
import itertools
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from scire_schema import protocol

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to a finished TLS handshake
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may wait for its next request
REQUEST_TIMEOUT = 30.0  # seconds from a request's first byte to the end of its body
WRITE_TIMEOUT = 30.0  # seconds to hand an answer to a peer that reads slowly
MAX_CONNECTIONS = 1000  # open connections in all; keep well under RLIMIT_NOFILE
MAX_CONNECTIONS_PER_PEER = 64  # open connections from one peer address
MAX_HEADER_BYTES = 16 * 1024  # request line and headers
MAX_HEADER_COUNT = 100
MAX_BODY_BYTES = 32 * 1024 * 1024
# A peer without a client certificate reaches only enrollment (a CSR and a few
# facts): a small cap keeps strangers from making the server buffer 32 MiB each.
MAX_ANONYMOUS_BODY_BYTES = 64 * 1024
MAX_THREADS = 16  # worker threads running the handler
MAX_QUEUED = 64  # complete requests waiting for a worker; beyond that, 503
RETRY_AFTER = 2  # seconds, sent with a 503
LOG_BURST = 10  # lines of one kind of peer noise per LOG_WINDOW before they are only counted
LOG_WINDOW = 60.0  # seconds

_READ_CHUNK = 64 * 1024
_LINGER_BYTES = 256 * 1024  # unread body discarded after a refusal, so the answer is not reset away
_LINGER_SECONDS = 1.0
_CLOSE_SECONDS = 5.0  # for a closing TLS connection to say goodbye before it is dropped
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_DIGITS = re.compile(r"^[0-9]{1,19}$")


@dataclass(frozen=True)
class Request:
    """One complete HTTP request, read and bounded by the listener."""

    method: str
    #: The request target up to ``?``; always starts with ``/``.
    path: str
    #: The part after ``?`` (without it), or "".
    query: str
    #: Header names in lower case; repeated headers joined with ", ".
    headers: Mapping[str, str]
    body: bytes
    #: The peer's (host, port).
    peer: tuple[str, int]
    #: The DER certificate the peer presented in the handshake, or None.
    peer_cert_der: bytes | None

    @property
    def peer_fingerprint(self) -> str | None:
        """SHA-256 of the peer's DER certificate, lower-case hex (Scire's identity), or None."""
        if self.peer_cert_der is None:
            return None
        return hashlib.sha256(self.peer_cert_der).hexdigest()


@dataclass(frozen=True)
class Response:
    """What a handler answers. The listener adds ``Server``, ``Date``,
    ``Content-Length`` and ``Connection``; a handler must not set those."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    #: Close the connection after this answer.
    close: bool = False


Handler = Callable[[Request], Response]
#: Answers a request on the event loop's own thread, or None to hand it to the
#: worker pool; it must never block (no database, no file, no network).
QuickHandler = Callable[[Request], "Response | None"]


@dataclass(frozen=True)
class ListenerLimits:
    """Deadlines (seconds) and caps; the defaults are the module constants."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    max_anonymous_body_bytes: int = MAX_ANONYMOUS_BODY_BYTES
    max_threads: int = MAX_THREADS
    max_queued: int = MAX_QUEUED

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "idle_timeout", "request_timeout", "write_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"listener {name} must be a positive number of seconds")
        for name in (
            "max_connections",
            "max_connections_per_peer",
            "max_header_bytes",
            "max_body_bytes",
            "max_anonymous_body_bytes",
            "max_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"listener {name} must be at least 1")
        if self.max_queued < 0:
            raise ValueError("listener max_queued must not be negative")


@dataclass(frozen=True)
class ListenerStats:
    """Counters for metrics: gauges first, then totals since start."""

    open_connections: int
    idle_connections: int
    requests_in_pool: int
    accepted: int
    refused_peer_cap: int
    refused_total_cap: int
    evicted_idle: int
    handshake_failures: int
    handshake_timeouts: int
    idle_timeouts: int
    request_timeouts: int
    write_timeouts: int
    requests: int
    refused_requests: int
    busy_refusals: int


class NoiseLog:
    """Log lines about peers, at most ``burst`` of one kind per ``window``
    seconds; the rest are counted and summed up in one line when the next
    window opens. Kinds are a small fixed vocabulary, so the table stays small."""

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = LOG_BURST,
        window: float = LOG_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        # kind -> [window start, lines logged in it, lines suppressed in it]
        self._kinds: dict[str, list[float]] = {}

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        now = self.clock()
        with self._lock:
            entry = self._kinds.setdefault(kind, [now, 0, 0])
            suppressed = 0
            if now - entry[0] >= self.window:
                suppressed = int(entry[2])
                entry[:] = [now, 0, 0]
            entry[1] += 1
            allowed = entry[1] <= self.burst
            if not allowed:
                entry[2] += 1
        if suppressed:
            self.logger.log(
                level, "%d more '%s' lines suppressed in the last window", suppressed, kind
            )
        if allowed:
            self.logger.log(level, message, *args)

    def flush(self) -> None:
        """Log what is still suppressed (at shutdown)."""
        with self._lock:
            pending = [(kind, int(entry[2])) for kind, entry in self._kinds.items() if entry[2]]
            self._kinds.clear()
        for kind, count in pending:
            self.logger.info("%d more '%s' lines suppressed in the last window", count, kind)


State = Literal["handshake", "idle", "reading", "busy"]


@dataclass(eq=False)
class _Connection:
    number: int
    peer: tuple[str, int]
    writer: asyncio.StreamWriter
    state: State = "handshake"
    closed: bool = False
    cert: bytes | None = None

    @property
    def who(self) -> str:
        host, port = self.peer
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _TLSStream:
    """TLS over a plain asyncio stream, through ``ssl.SSLObject`` and memory
    BIOs. asyncio's own TLS transport (``start_tls``) keeps a 256 KiB read
    buffer for every connection, about 280 KiB per idle connection in all;
    here an idle connection holds only OpenSSL's state."""

    def __init__(
        self, context: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def handshake(self) -> None:
        """Raises ``ssl.SSLError`` (after sending the alert), or ``_PeerGone``."""
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise _PeerGone() from None
            except ssl.SSLError:
                self._send_pending()  # the alert tells the peer why
                raise
        await self._flush()

    def peer_cert(self) -> bytes | None:
        return self._ssl.getpeercert(binary_form=True)

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext; b"" at the end of the stream."""
        while True:
            try:
                return self._ssl.read(size)
            except ssl.SSLWantReadError:
                self._send_pending()  # TLS 1.3 may have something to say (key update)
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def write_nowait(self, data: bytes) -> None:
        self._ssl.write(data)
        self._send_pending()

    async def write(self, data: bytes) -> None:
        self.write_nowait(data)
        await self._writer.drain()

    def close_notify(self) -> None:
        """Say goodbye in TLS; the peer's answer is not waited for."""
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass
        self._send_pending()

    async def _fill(self) -> bool:
        chunk = await self._reader.read(_READ_CHUNK)
        if not chunk:
            return False
        self._incoming.write(chunk)
        return True

    def _send_pending(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)

    async def _flush(self) -> None:
        self._send_pending()
        await self._writer.drain()


class _Refusal(Exception):
    """A request the listener answers itself (4xx) before any worker sees it."""

    def __init__(self, status: int, why: str, *, unread_body: bool = False) -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.unread_body = unread_body


class _PeerGone(Exception):
    """The peer closed the connection."""


@dataclass
class _Counters:
    accepted: int = 0
    refused_peer_cap: int = 0
    refused_total_cap: int = 0
    evicted_idle: int = 0
    handshake_failures: int = 0
    handshake_timeouts: int = 0
    idle_timeouts: int = 0
    request_timeouts: int = 0
    write_timeouts: int = 0
    requests: int = 0
    refused_requests: int = 0
    busy_refusals: int = 0


class Listener:
    """The TLS HTTP/1.1 front end. ``start()`` binds and serves in background
    threads; ``drain(grace)`` stops it.

    ``handler`` runs in one of ``limits.max_threads`` worker threads and must
    return a :class:`Response`; an exception it raises becomes a bare 500 (and
    one ERROR line with the traceback). ``server_name`` is the whole ``Server:``
    header; ``name`` prefixes log lines and thread names.
    """

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        handler: Handler,
        limits: ListenerLimits | None = None,
        *,
        server_name: str = "Scire",
        name: str = "listener",
        quick: QuickHandler | None = None,
    ) -> None:
        """``quick`` may answer a request from memory before it queues for a
        worker (``XMLRPCApp.quick``): a thread hop costs more than such an answer."""
        self.host = host
        self.quick = quick
        self.port = port
        self.context = context
        self.handler = handler
        self.limits = limits or ListenerLimits()
        self.server_name = server_name
        self.name = name
        self.noise = NoiseLog(log)
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.max_threads, thread_name_prefix=f"{name}-worker"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._draining = False
        self._stopped = False
        self._numbers = itertools.count(1)
        # Touched only on the event loop's thread.
        self._connections: dict[int, _Connection] = {}
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._idle: collections.OrderedDict[int, _Connection] = collections.OrderedDict()
        self._in_pool = 0
        self._busy = 0
        self._quiet: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._counters = _Counters()

    # Life cycle.

    def start(self) -> None:
        """Bind and start serving. Raises ``OSError`` when the address cannot be bound."""
        if self._loop is not None:
            raise RuntimeError("listener already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=512)
        sock.setblocking(False)
        bound = sock.getsockname()
        self._address = (str(bound[0]), int(bound[1]))
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=f"{self.name}-loop", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._open(sock), loop)
        try:
            future.result()
        except BaseException:
            sock.close()
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join()
            loop.close()
            self._pool.shutdown(wait=False)
            raise
        log.info("%s: listening on %s:%d", self.name, *self._address)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); with port 0 the port the system chose."""
        if self._address is None:
            raise RuntimeError("listener not started")
        return self._address

    @property
    def draining(self) -> bool:
        return self._draining

    def stats(self) -> ListenerStats:
        c = self._counters
        return ListenerStats(
            open_connections=len(self._connections),
            idle_connections=len(self._idle),
            requests_in_pool=self._in_pool,
            accepted=c.accepted,
            refused_peer_cap=c.refused_peer_cap,
            refused_total_cap=c.refused_total_cap,
            evicted_idle=c.evicted_idle,
            handshake_failures=c.handshake_failures,
            handshake_timeouts=c.handshake_timeouts,
            idle_timeouts=c.idle_timeouts,
            request_timeouts=c.request_timeouts,
            write_timeouts=c.write_timeouts,
            requests=c.requests,
            refused_requests=c.refused_requests,
            busy_refusals=c.busy_refusals,
        )

    def drain(self, grace: float) -> bool:
        """Stop accepting, close idle and half-read connections, give requests
        already handed to a worker ``grace`` seconds to be answered (each answer
        says ``Connection: close``), then close everything and join the threads.
        True when no request was cut off. Safe to call more than once."""
        loop = self._loop
        if loop is None or self._stopped:
            return True
        self._stopped = True
        clean = asyncio.run_coroutine_threadsafe(self._drain(grace), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join()
        # Requests still queued are dropped; one already running is waited for,
        # so the program does not tear down what it uses under it.
        self._pool.shutdown(wait=True, cancel_futures=True)
        loop.close()
        self.noise.flush()
        log.info("%s: stopped (%s)", self.name, "clean" if clean else "requests cut off")
        return clean

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _open(self, sock: socket.socket) -> None:
        self._quiet = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=_READ_CHUNK)

    async def _drain(self, grace: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            if conn.state != "busy":
                self._close(conn)
        assert self._quiet is not None
        if self._busy:
            self._quiet.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._quiet.wait()
            except TimeoutError:
                pass
        clean = self._busy == 0
        for conn in list(self._connections.values()):
            self._close(conn)
        # What is left are connections whose last answer is still leaving;
        # give them a moment (they are bounded by _CLOSE_SECONDS anyway).
        tasks = list(self._tasks)
        if tasks:
            flush = min(max(deadline - loop.time(), 0.5), _CLOSE_SECONDS)
            _, pending = await asyncio.wait(tasks, timeout=flush)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return clean

    # Connections.

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername") or ("?", 0)
        conn = _Connection(next(self._numbers), (str(peername[0]), int(peername[1])), writer)
        stream: _TLSStream | None = None
        flush = False
        try:
            if self._admit(conn):
                stream = _TLSStream(self.context, reader, writer)
                flush = await self._converse(conn, stream)
        except (_PeerGone, ConnectionError, ssl.SSLError, OSError) as exc:
            if not conn.closed:
                log.debug("%s: %s: connection ended: %s", self.name, conn.who, type(exc).__name__)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: %s: connection failed", self.name, conn.who)
        finally:
            self._forget(conn)
            await self._finish(writer, stream, flush)
            self._tasks.discard(task)

    async def _finish(
        self, writer: asyncio.StreamWriter, stream: _TLSStream | None, flush: bool
    ) -> None:
        """Close the transport: after an answer, let it leave first (bounded);
        otherwise drop the connection at once."""
        try:
            if flush and stream is not None and not writer.transport.is_closing():
                stream.close_notify()
                writer.close()
                async with asyncio.timeout(_CLOSE_SECONDS):
                    await writer.wait_closed()
        except (asyncio.CancelledError, TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.transport.abort()

    def _admit(self, conn: _Connection) -> bool:
        """The caps, checked before TLS starts so a refused peer costs no handshake."""
        host = conn.peer[0]
        limits = self.limits
        if self._draining:
            return False
        if self._per_peer[host] >= limits.max_connections_per_peer:
            self._counters.refused_peer_cap += 1
            self.noise.log(
                logging.WARNING,
                "refused: per-address cap",
                "%s: connection from %s refused: %d connections from this address already open",
                self.name,
                conn.who,
                limits.max_connections_per_peer,
            )
            return False
        if len(self._connections) >= limits.max_connections:
            if not self._idle:
                self._counters.refused_total_cap += 1
                self.noise.log(
                    logging.WARNING,
                    "refused: connection cap",
                    "%s: connection from %s refused: %d connections open, none idle",
                    self.name,
                    conn.who,
                    limits.max_connections,
                )
                return False
            victim = next(iter(self._idle.values()))
            self._counters.evicted_idle += 1
            self.noise.log(
                logging.INFO,
                "evicted idle",
                "%s: idle connection from %s closed to make room (%d connections open)",
                self.name,
                victim.who,
                limits.max_connections,
            )
            self._close(victim)
        self._connections[conn.number] = conn
        self._per_peer[host] += 1
        self._counters.accepted += 1
        return True

    def _forget(self, conn: _Connection) -> None:
        """Free the connection's slot in the caps (once)."""
        if conn.closed:
            return
        conn.closed = True
        if self._connections.pop(conn.number, None) is None:
            return  # never admitted
        self._idle.pop(conn.number, None)
        host = conn.peer[0]
        self._per_peer[host] -= 1
        if self._per_peer[host] <= 0:
            del self._per_peer[host]

    def _close(self, conn: _Connection) -> None:
        """Drop a connection from outside its task (eviction, drain): its slot
        is free at once; its task sees the end of the stream and finishes."""
        self._forget(conn)
        conn.writer.transport.abort()

    def _set_state(self, conn: _Connection, state: State) -> None:
        if conn.state == "idle":
            self._idle.pop(conn.number, None)
        conn.state = state
        if state == "idle":
            self._idle[conn.number] = conn

    async def _converse(self, conn: _Connection, stream: _TLSStream) -> bool:
        """Handshake, then requests until the connection ends. True when the
        last thing written must reach the peer before the socket closes."""
        limits = self.limits
        try:
            async with asyncio.timeout(limits.handshake_timeout):
                await stream.handshake()
        except TimeoutError:
            self._counters.handshake_timeouts += 1
            self.noise.log(
                logging.INFO,
                "handshake timed out",
                "%s: TLS handshake with %s timed out after %g s",
                self.name,
                conn.who,
                limits.handshake_timeout,
            )
            return False
        except (ssl.SSLError, ConnectionError, OSError, _PeerGone) as exc:
            if not conn.closed:
                self._counters.handshake_failures += 1
                self.noise.log(
                    logging.INFO,
                    "handshake failed",
                    "%s: TLS handshake with %s failed: %s",
                    self.name,
                    conn.who,
                    _tls_reason(exc),
                )
            return False
        conn.cert = stream.peer_cert()
        buffer = bytearray()
        while not conn.closed and not self._draining:
            self._set_state(conn, "idle")
            if not buffer:
                try:
                    async with asyncio.timeout(limits.idle_timeout):
                        chunk = await stream.read(_READ_CHUNK)
                except TimeoutError:
                    self._counters.idle_timeouts += 1
                    log.debug("%s: %s: idle keep-alive connection closed", self.name, conn.who)
                    return False
                if not chunk:
                    return False
                buffer += chunk
            if conn.closed:
                return False
            self._set_state(conn, "reading")
            try:
                async with asyncio.timeout(limits.request_timeout):
                    request, keep_alive = await self._read_request(conn, stream, buffer)
            except TimeoutError:
                self._counters.request_timeouts += 1
                self.noise.log(
                    logging.INFO,
                    "request timed out",
                    "%s: request from %s not complete after %g s; connection closed",
                    self.name,
                    conn.who,
                    limits.request_timeout,
                )
                stream.write_nowait(self._head(408, (), 0, close=True))
                return True
            except _Refusal as refusal:
                self._counters.refused_requests += 1
                self.noise.log(
                    logging.INFO,
                    "request refused",
                    "%s: request from %s refused with %d: %s",
                    self.name,
                    conn.who,
                    refusal.status,
                    refusal.why,
                )
                body = (refusal.why + "\n").encode()
                head = self._head(
                    refusal.status, (("Content-Type", "text/plain"),), len(body), True
                )
                if not await self._send(conn, stream, head + body):
                    return False
                if refusal.unread_body:
                    await _linger(stream)
                return True
            self._counters.requests += 1
            self._set_state(conn, "busy")
            self._busy += 1
            try:
                response = await self._run_handler(request)
                close = response.close or not keep_alive or self._draining
                body = b"" if request.method == "HEAD" else response.body
                head = self._head(response.status, response.headers, len(response.body), close)
                if not await self._send(conn, stream, head + body):
                    return False
            finally:
                self._busy -= 1
                if self._busy == 0 and self._quiet is not None:
                    self._quiet.set()
            if close:
                return True
        return False

    async def _send(self, conn: _Connection, stream: _TLSStream, data: bytes) -> bool:
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await stream.write(data)
        except TimeoutError:
            self._counters.write_timeouts += 1
            self.noise.log(
                logging.INFO,
                "write timed out",
                "%s: %s did not read its answer within %g s; connection closed",
                self.name,
                conn.who,
                self.limits.write_timeout,
            )
            return False
        return True

    async def _run_handler(self, request: Request) -> Response:
        if self.quick is not None:
            try:
                answer = self.quick(request)
            except Exception:
                log.exception("%s: quick handler failed; the worker pool answers", self.name)
                answer = None
            if answer is not None:
                return answer
        limits = self.limits
        if self._in_pool >= limits.max_threads + limits.max_queued:
            self._counters.busy_refusals += 1
            self.noise.log(
                logging.WARNING,
                "busy",
                "%s: request from %s:%d answered 503: %d requests in the worker pool",
                self.name,
                *request.peer,
                self._in_pool,
            )
            return Response(
                503,
                ((protocol.RETRY_AFTER_HEADER, str(RETRY_AFTER)), ("Content-Type", "text/plain")),
                b"busy; retry later\n",
            )
        assert self._loop is not None
        self._in_pool += 1
        try:
            return await self._loop.run_in_executor(self._pool, self._call_handler, request)
        finally:
            self._in_pool -= 1

    def _call_handler(self, request: Request) -> Response:
        """In a worker thread: the handler, with its failures turned into a bare 500."""
        try:
            response = self.handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not a Response")
            for name, value in response.headers:
                if not _TOKEN.match(name.encode("latin-1", "replace")) or any(
                    ch in value for ch in "\r\n\0"
                ):
                    raise ValueError(f"handler returned a bad header {name[:40]!r}")
            if not 200 <= response.status <= 599:
                raise ValueError(f"handler returned status {response.status}")
            return response
        except Exception:
            log.exception(
                "%s: handler failed on %s %s from %s:%d",
                self.name,
                request.method,
                request.path[:80],
                *request.peer,
            )
            return Response(
                500, (("Content-Type", "text/plain"),), b"internal error; see the server log\n"
            )

    # HTTP.

    async def _read_request(
        self,
        conn: _Connection,
        stream: _TLSStream,
        buffer: bytearray,
    ) -> tuple[Request, bool]:
        """Read one request from ``buffer`` and the stream; what follows it stays
        in ``buffer``. Returns the request and whether the connection may stay open."""
        limits = self.limits
        while True:
            end = buffer.find(b"\r\n\r\n", 0, limits.max_header_bytes + 4)
            if end >= 0:
                break
            if len(buffer) > limits.max_header_bytes:
                raise _Refusal(431, f"request header over {limits.max_header_bytes} bytes")
            chunk = await stream.read(_READ_CHUNK)
            if not chunk:
                raise _PeerGone()
            buffer += chunk
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        method, path, query, version, headers = _parse_head(head)
        keep_alive = version == "HTTP/1.1"
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        if "close" in tokens:
            keep_alive = False
        if "transfer-encoding" in headers:
            raise _Refusal(411, "chunked or other transfer-encoded bodies are not accepted")
        length_text = headers.get("content-length")
        if length_text is None:
            if method == "POST":
                raise _Refusal(411, "a POST needs a Content-Length")
            length = 0
        else:
            if not _DIGITS.match(length_text):
                raise _Refusal(400, "bad Content-Length")
            length = int(length_text)
        cap = limits.max_body_bytes if conn.cert else limits.max_anonymous_body_bytes
        if length > cap:
            # Before any 100 Continue: a client that waits for it sends nothing.
            without = "" if conn.cert else " without a client certificate"
            raise _Refusal(413, f"request body over {cap} bytes{without}", unread_body=True)
        expect = headers.get("expect", "").lower()
        if expect and expect != "100-continue":
            raise _Refusal(417, "only Expect: 100-continue is understood")
        if expect and length > len(buffer):
            stream.write_nowait(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buffer) < length:
            chunk = await stream.read(min(_READ_CHUNK, length - len(buffer)))
            if not chunk:
                raise _PeerGone()
            buffer += chunk
        body = bytes(buffer[:length])
        del buffer[:length]
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=body,
            peer=conn.peer,
            peer_cert_der=conn.cert,
        )
        return request, keep_alive

    def _head(
        self, status: int, headers: tuple[tuple[str, str], ...], length: int, close: bool
    ) -> bytes:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Status"
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Server: {self.server_name}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
        ]
        reserved = {"server", "date", "content-length", "connection", "transfer-encoding"}
        lines += [f"{name}: {value}" for name, value in headers if name.lower() not in reserved]
        lines.append(f"Content-Length: {length}")
        lines.append("Connection: close" if close else "Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _parse_head(head: bytes) -> tuple[str, str, str, str, dict[str, str]]:
    """The request line and headers; a :class:`_Refusal` names what is wrong."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]):
        raise _Refusal(400, "bad request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise _Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise _Refusal(400, "bad request line")
    if not target.startswith(b"/") or not all(0x21 <= b <= 0x7E for b in target):
        raise _Refusal(400, "bad request target")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise _Refusal(431, f"more than {MAX_HEADER_COUNT} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise _Refusal(400, "bad header field")
        value = value.strip(b" \t")
        if not _HEADER_VALUE.match(value):
            raise _Refusal(400, "bad header field")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise _Refusal(400, "conflicting Content-Length fields")
            if key in ("content-length", "host"):
                continue
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
    path, _, query = target.decode("ascii").partition("?")
    return method.decode("ascii"), path, query, version.decode("ascii"), headers


async def _linger(stream: _TLSStream) -> None:
    """After refusing a request whose body was not read, read and drop a bounded
    amount of it for a moment, so closing does not reset the answer away."""
    left = _LINGER_BYTES
    try:
        async with asyncio.timeout(_LINGER_SECONDS):
            while left > 0:
                chunk = await stream.read(min(_READ_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
    except (TimeoutError, ConnectionError, OSError):  # ssl.SSLError is an OSError
        return


def _tls_reason(exc: BaseException) -> str:
    """A short reason for a log line (the OpenSSL reason code, not a traceback)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)[:80]
    if isinstance(exc, _PeerGone):
        return "peer closed the connection"
    return type(exc).__name__
