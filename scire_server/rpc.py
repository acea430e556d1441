"""The XML-RPC listener: TLS, a bounded thread pool, HTTP/1.1 keep-alive, and
the one place errors become faults.

The caller's identity is the SHA-256 fingerprint of the certificate it
presented in the TLS handshake; the API layer (``RemoteMethods.identify``)
looks it up on every call, and records each refusal. Arguments never name the
caller. This module talks to the API layer only, never to the store.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import socket
import socketserver
import ssl
import threading
import time
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from scire_schema import protocol, tls
from scire_server.api import Caller, RemoteMethods
from scire_server.exceptions import Forbidden, InvalidArgument, ScireError, Unavailable, clip

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 32 * 1024 * 1024


class _Handler(SimpleXMLRPCRequestHandler):
    protocol_version = (
        "HTTP/1.1"  # keep-alive: an agent's poll, ack and reports share one connection
    )
    rpc_paths = ("/", "/RPC2")
    server: ScireRPCServer

    def setup(self) -> None:
        self.connection = self.request
        self.connection.settimeout(self.server.request_timeout)
        super().setup()

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_REQUEST_BYTES:
            self.send_error(413 if length > 0 else 400, "request too large or without length")
            self.close_connection = True
            return
        # An idle keep-alive connection holds a pool thread; give it up (and
        # say so in the answer) when other connections wait for one, or when
        # the daemon is stopping.
        self._closing = self.server.stopping.is_set() or self.server.queued_connections > 0
        super().do_POST()

    def end_headers(self) -> None:
        if getattr(self, "_closing", False):
            self.send_header("Connection", "close")
        super().end_headers()

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        assert isinstance(self.request, ssl.SSLSocket)
        return self.server.call(self.request, self.client_address, method, params)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


class ScireRPCServer(socketserver.TCPServer, SimpleXMLRPCDispatcher):
    """A TCP server whose connections are TLS-wrapped and served by a bounded pool."""

    allow_reuse_address = True
    request_queue_size = 128
    logRequests = False  # one log line per refused call or transition is enough

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        methods: RemoteMethods,
        max_threads: int,
        request_timeout: float,
    ) -> None:
        self.context = context
        self.methods = methods
        self.request_timeout = request_timeout
        self.table = methods.table()
        self.pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="rpc")
        self.stopping = threading.Event()
        self._in_flight = 0
        self.queued_connections = 0  # accepted, waiting for a pool thread
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding="utf-8")
        socketserver.TCPServer.__init__(self, address, _Handler)

    # Connections: accepted by the listener thread, handshaken and served in the pool.

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
            self.queued_connections += 1
        self.pool.submit(self._serve_connection, request, client_address)

    def _serve_connection(self, raw: socket.socket, client_address: Any) -> None:
        with self._lock:
            self.queued_connections -= 1
        try:
            raw.settimeout(self.request_timeout)
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s refused: %s", client_address[0], exc)
            self._forget(raw)
            raw.close()
            return
        with self._lock:
            self._connections.discard(raw)
            self._connections.add(conn)
        try:
            _Handler(conn, client_address, self)
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection from %s ended: %s", client_address[0], exc)
        except Exception:
            log.exception("connection from %s failed", client_address[0])
        finally:
            self._forget(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.discard(sock)

    # Calls.

    def call(self, conn: ssl.SSLSocket, address: Any, method: str, params: tuple[Any, ...]) -> Any:
        with self._lock:
            self._in_flight += 1
        caller: Caller | None = None
        try:
            if self.stopping.is_set():
                raise Unavailable("server is shutting down; try another server or later")
            entry = self.table.get(method)
            if entry is None:
                raise Forbidden(f"no method {clip(method)}")
            audience, function = entry
            if audience != "open":
                caller = self.methods.identify(tls.peer_fingerprint(conn))
                if audience == "agent" and caller.kind != "client":
                    raise Forbidden(f"{method} is for agents")
                if audience in ("user", "admin") and caller.kind != "user":
                    raise Forbidden(f"{method} is for users of scire-admin")
                if audience == "admin" and not caller.is_admin:
                    raise Forbidden(f"{method} needs an administrator; {caller.name} is not one")
            try:
                inspect.signature(function).bind(caller, *params)
            except TypeError as exc:
                raise InvalidArgument(f"wrong arguments for {method}: {exc}") from None
            return to_xmlrpc(function(caller, *params))
        except ScireError as exc:
            raise self._fault(method, caller, address, exc) from None
        except Exception:
            log.exception("%s from %s failed", method, address[0])
            raise xmlrpc.client.Fault(
                99, f"internal error in {method}; see the server log"
            ) from None
        finally:
            with self._lock:
                self._in_flight -= 1

    def _fault(
        self, method: str, caller: Caller | None, address: Any, exc: ScireError
    ) -> xmlrpc.client.Fault:
        self.methods.record_refusal(method, caller, address[0], exc)
        return xmlrpc.client.Fault(exc.code, exc.message)

    # Shutdown.

    def drain(self, grace: float) -> bool:
        """Stop taking calls, give in-flight ones ``grace`` seconds, then close
        every connection. True when nothing was cut off."""
        self.stopping.set()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if self._in_flight == 0:
                    break
            time.sleep(0.05)
        with self._lock:
            clean = self._in_flight == 0
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.pool.shutdown(wait=True, cancel_futures=True)
        return clean


def to_xmlrpc(value: Any) -> Any:
    """What XML-RPC can carry: times as ISO strings (UTC, Z), ``None`` kept (allow_none)."""
    if isinstance(value, dt.datetime):
        return protocol.format_time(value)
    if isinstance(value, dict):
        return {str(k): to_xmlrpc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_xmlrpc(v) for v in value]
    return value
