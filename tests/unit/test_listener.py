"""The TLS front end (``scire_schema.listener``) on 127.0.0.1, with real
certificates from ``pki`` and real stdlib clients: idle and half-open
connections cost no worker, deadlines cut slow peers, caps hold, and hostile
requests are refused before a worker sees them."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scire_schema import certs as certs_module
from scire_schema import files as files_module
from scire_schema import listener as listener_module
from scire_schema import tls
from scire_schema.listener import Listener, ListenerLimits, NoiseLog, Request, Response
from scire_schema.rpcwire import MALFORMED_REQUEST, Call, XMLRPCApp, shorten
from scire_server import ca as ca_module

WAIT = 20.0  # seconds any one wait in these tests may take before it fails


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_fingerprint: str
    foreign_cert: Path
    foreign_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = ca_module.create_ca()
    files: dict[str, Path] = {"ca": root / "ca.pem"}
    files_module.write_public(files["ca"], certs_module.cert_to_pem(ca_cert))

    def issue(name: str, role: str, ca: tuple[Any, Any]) -> tuple[Path, Path, Any]:
        key = certs_module.generate_key()
        cert = ca_module.issue_certificate(ca[0], ca[1], key.public_key(), name, role, [name])
        files_module.write_public(root / f"{name}.pem", certs_module.cert_to_pem(cert))
        files_module.write_private(root / f"{name}.key", certs_module.key_to_pem(key))
        return root / f"{name}.pem", root / f"{name}.key", cert

    server = issue("127.0.0.1", ca_module.ROLE_SERVER, (ca_key, ca_cert))
    client = issue("web-17", ca_module.ROLE_CLIENT, (ca_key, ca_cert))
    foreign = issue("intruder", ca_module.ROLE_CLIENT, ca_module.create_ca("Other CA"))
    return Certs(
        ca=files["ca"],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        client_fingerprint=certs_module.fingerprint(client[2]),
        foreign_cert=foreign[0],
        foreign_key=foreign[1],
    )


@dataclass
class Gate:
    """Lets a test hold requests for ``/slow`` inside a worker."""

    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    release: threading.Event = field(default_factory=threading.Event)


def dispatch(call: Call) -> Any:
    if call.method == "echo":
        return {"params": list(call.params), "fingerprint": call.peer_fingerprint}
    if call.method == "boom":
        raise RuntimeError("secret internal detail")
    raise xmlrpc.client.Fault(2, f"no method {shorten(call.method)}")


def plain_handler(gate: Gate) -> Callable[[Request], Response]:
    def handle(request: Request) -> Response:
        if request.path == "/healthz":
            return Response(200, (("Content-Type", "text/plain"),), b"ok\n")
        if request.path == "/slow":
            gate.entered.release()
            gate.release.wait(WAIT)
            return Response(200, (), b"slow done\n")
        if request.path == "/crash":
            raise RuntimeError("secret internal detail")
        return Response(404, (), b"not found\n")

    return handle


class Listeners:
    """Starts listeners for a test and drains them afterwards."""

    def __init__(self, certs: Certs) -> None:
        self.certs = certs
        self.started: list[Listener] = []
        self.gate = Gate()

    def start(self, **limits: Any) -> Listener:
        context = tls.server_context(self.certs.server_cert, self.certs.server_key, self.certs.ca)
        app = XMLRPCApp(dispatch, fallback=plain_handler(self.gate))
        listener = Listener("127.0.0.1", 0, context, app, ListenerLimits(**limits), name="test")
        listener.start()
        self.started.append(listener)
        return listener

    def close(self) -> None:
        self.gate.release.set()
        for listener in self.started:
            listener.drain(1.0)


@pytest.fixture
def listeners(certs: Certs) -> Iterator[Listeners]:
    made = Listeners(certs)
    yield made
    made.close()


def client_context(certs: Certs, with_cert: bool = True) -> ssl.SSLContext:
    if with_cert:
        return tls.client_context(certs.ca, certs.client_cert, certs.client_key)
    return tls.client_context(certs.ca)


class _Transport(xmlrpc.client.SafeTransport):
    """The stdlib transport with a bounded socket timeout."""

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        connection = super().make_connection(host)
        connection.timeout = WAIT
        return connection


def proxy(listener: Listener, context: ssl.SSLContext) -> xmlrpc.client.ServerProxy:
    host, port = listener.address
    return xmlrpc.client.ServerProxy(
        f"https://{host}:{port}/RPC2",
        transport=_Transport(context=context),
        allow_none=True,
    )


def tls_socket(listener: Listener, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(listener.address, timeout=WAIT)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def raw_socket(listener: Listener) -> socket.socket:
    return socket.create_connection(listener.address, timeout=WAIT)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response read off a socket (the listener always sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed this connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def worker_threads() -> int:
    return sum(t.name.startswith("test-worker") for t in threading.enumerate())


# A normal call.


def test_mutual_tls_keepalive_calls(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start()
    server = proxy(listener, client_context(certs))
    for n in range(3):
        answer = server.echo(n, "x", [1, {"a": None}])
        assert answer == {
            "params": [n, "x", [1, {"a": None}]],
            "fingerprint": certs.client_fingerprint,
        }
    stats = listener.stats()
    assert stats.accepted == 1  # one kept-alive connection carried all three calls
    assert stats.requests == 3
    anonymous = proxy(listener, client_context(certs, with_cert=False))
    assert anonymous.echo()["fingerprint"] is None


def test_faults_and_internal_errors_over_the_wire(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start()
    server = proxy(listener, client_context(certs))
    with pytest.raises(xmlrpc.client.Fault) as refused:
        server.nosuch()
    assert refused.value.faultCode == 2
    with pytest.raises(xmlrpc.client.Fault) as internal:
        server.boom()
    assert internal.value.faultCode == 99
    assert internal.value.faultString == "internal error; see the server log"
    assert server.echo(1)["params"] == [1]  # the connection is still good


def test_server_header_names_no_python(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start()
    connection = http.client.HTTPSConnection(
        "127.0.0.1", listener.address[1], context=client_context(certs), timeout=WAIT
    )
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    assert response.status == 200
    assert response.read() == b"ok\n"
    assert response.getheader("Server") == "Scire"
    connection.request("HEAD", "/healthz")
    head = connection.getresponse()
    assert head.status == 200 and head.read() == b""
    connection.request("GET", "/crash")
    crash = connection.getresponse()
    assert crash.status == 500
    assert b"secret" not in crash.read()
    connection.close()


# Idle, half-open and slow peers.


def test_idle_and_half_open_connections_do_not_stop_a_call(
    listeners: Listeners, certs: Certs
) -> None:
    listener = listeners.start(
        max_threads=4, max_connections=1000, max_connections_per_peer=1000, handshake_timeout=60
    )
    context = client_context(certs)
    idle = [tls_socket(listener, context) for _ in range(200)]
    half_open = [raw_socket(listener) for _ in range(200)]
    try:
        wait_for(lambda: listener.stats().open_connections == 400)
        answer = proxy(listener, context).echo("through")
        assert answer["params"] == ["through"]
        stats = listener.stats()
        assert stats.open_connections >= 400  # the flood is still there
        assert (stats.accepted, stats.requests) == (401, 1)
        assert worker_threads() <= 4
    finally:
        for sock in idle + half_open:
            sock.close()


def test_slow_drip_requests_are_cut_at_the_request_deadline(
    listeners: Listeners, certs: Certs
) -> None:
    listener = listeners.start(max_threads=2, request_timeout=1.5, max_connections_per_peer=100)
    context = client_context(certs)
    request = b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100

    def drip() -> str:
        with tls_socket(listener, context) as sock:
            sock.settimeout(0.25)
            for byte in request:  # about one byte every 0.25 s: far slower than the deadline
                try:
                    sock.sendall(bytes([byte]))
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return "closed"
                return "408" if data.startswith(b"HTTP/1.1 408 ") else f"other: {data[:40]!r}"
            return "completed"

    with ThreadPoolExecutor(max_workers=20) as pool:
        drips = [pool.submit(drip) for _ in range(20)]
        wait_for(lambda: listener.stats().open_connections >= 20)
        assert proxy(listener, context).echo("meanwhile")["params"] == ["meanwhile"]
        outcomes = [future.result(timeout=60) for future in drips]
    assert set(outcomes) <= {"408", "closed"}, outcomes
    assert listener.stats().request_timeouts == 20


def test_handshake_and_idle_deadlines(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start(handshake_timeout=0.5, idle_timeout=0.5)
    with raw_socket(listener) as silent:
        assert closed_by_server(silent)
    with tls_socket(listener, client_context(certs)) as idle:
        assert closed_by_server(idle)
    wait_for(lambda: listener.stats().open_connections == 0)
    stats = listener.stats()
    assert stats.handshake_timeouts == 1
    assert stats.idle_timeouts == 1


def test_foreign_ca_is_refused_at_the_handshake(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start()
    context = tls.client_context(certs.ca, certs.foreign_cert, certs.foreign_key)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_socket(listener, context) as sock:
            # With TLS 1.3 the client learns of the refusal on its first read.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if sock.recv(1) == b"":
                raise ConnectionError("closed")
    wait_for(lambda: listener.stats().handshake_failures == 1)


# Caps.


def test_per_address_cap(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start(max_connections_per_peer=3)
    context = client_context(certs)
    held = [tls_socket(listener, context) for _ in range(3)]
    try:
        wait_for(lambda: listener.stats().idle_connections == 3)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_socket(listener, context).close()
        assert listener.stats().refused_peer_cap == 1
        held.pop().close()
        wait_for(lambda: listener.stats().open_connections == 2)
        assert proxy(listener, context).echo(1)["params"] == [1]
    finally:
        for sock in held:
            sock.close()


def test_total_cap_closes_the_oldest_idle_connection(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start(max_connections=3)
    context = client_context(certs)
    held = []
    for _ in range(3):
        held.append(tls_socket(listener, context))
        count = len(held)
        wait_for(lambda count=count: listener.stats().idle_connections == count)  # type: ignore[misc]
    with tls_socket(listener, context) as newcomer:
        newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(newcomer)[0] == 200
    assert closed_by_server(held[0])
    assert listener.stats().evicted_idle == 1
    for sock in held:
        sock.close()


def test_total_cap_refuses_when_nothing_is_idle(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start(max_connections=3, handshake_timeout=60)
    half_open = [raw_socket(listener) for _ in range(3)]
    try:
        wait_for(lambda: listener.stats().open_connections == 3)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_socket(listener, client_context(certs)).close()
        assert listener.stats().refused_total_cap == 1
    finally:
        for sock in half_open:
            sock.close()


# Requests refused before a worker sees them.


def test_a_stranger_s_body_is_capped_lower_than_an_agent_s(
    listeners: Listeners, certs: Certs
) -> None:
    listener = listeners.start(max_body_bytes=100_000, max_anonymous_body_bytes=1000)
    body = xmlrpc.client.dumps(("x" * 5000,), "echo").encode()
    request = b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with tls_socket(listener, client_context(certs, with_cert=False)) as sock:
        sock.sendall(request + body)
        status, _, answer = read_response(sock)
        assert status == 413
        assert b"without a client certificate" in answer
    with tls_socket(listener, client_context(certs)) as sock:
        sock.sendall(request + body)
        assert read_response(sock)[0] == 200


def test_oversize_body_gets_413_without_100_continue(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start(max_body_bytes=1000)
    context = client_context(certs)
    with tls_socket(listener, context) as sock:
        sock.sendall(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        status, headers, _ = read_response(sock)
        assert status == 413
        assert headers["connection"] == "close"
    with tls_socket(listener, context) as sock:
        sock.sendall(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
        )
        assert read_response(sock)[0] == 413
    with tls_socket(listener, context) as sock:
        # Within the bound, Expect is answered with 100 Continue, then the call.
        body = xmlrpc.client.dumps((1,), "echo").encode()
        sock.sendall(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status, _, answer = read_response(sock)
        assert status == 200 and xmlrpc.client.loads(answer)[0][0]["params"] == [1]
    assert listener.stats().requests == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            411,
        ),
        (b"POST /RPC2 HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
        (b"GET /healthz HTTP/1.1\r\n folded\r\n\r\n", 400),
    ],
)
def test_bad_requests_are_refused_by_the_listener(
    listeners: Listeners, certs: Certs, request_bytes: bytes, status: int
) -> None:
    listener = listeners.start()
    with tls_socket(listener, client_context(certs)) as sock:
        sock.sendall(request_bytes)
        assert read_response(sock)[0] == status
        assert closed_by_server(sock)
    assert listener.stats().requests == 0


def test_full_pool_answers_503(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start(max_threads=1, max_queued=1)
    context = client_context(certs)
    socks = [tls_socket(listener, context) for _ in range(3)]
    try:
        socks[0].sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert listeners.gate.entered.acquire(timeout=WAIT)
        socks[1].sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: listener.stats().requests_in_pool == 2)
        socks[2].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(socks[2])
        assert status == 503
        assert headers["retry-after"] == str(listener_module.RETRY_AFTER)
        listeners.gate.release.set()
        assert read_response(socks[0])[0] == 200
        assert read_response(socks[1])[0] == 200
        assert listener.stats().busy_refusals == 1
    finally:
        for sock in socks:
            sock.close()


def test_hostile_xml_over_the_wire_is_fault_12(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start()
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa">'
        + b"".join(
            f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'.encode() for i in range(9)
        )
        + b"]><methodCall><methodName>&j;</methodName></methodCall>"
    )
    connection = http.client.HTTPSConnection(
        "127.0.0.1", listener.address[1], context=client_context(certs), timeout=WAIT
    )
    for body in (laughs, b"<methodCall>" * 10000, b"\xff\xfe"):
        connection.request("POST", "/RPC2", body, {"Content-Type": "text/xml"})
        response = connection.getresponse()
        assert response.status == 200
        with pytest.raises(xmlrpc.client.Fault) as fault:
            xmlrpc.client.loads(response.read())
        assert fault.value.faultCode == MALFORMED_REQUEST
        assert "Error" not in fault.value.faultString
    connection.close()


# Shutdown.


def test_drain_finishes_in_flight_requests_and_closes_the_rest(
    listeners: Listeners, certs: Certs
) -> None:
    listener = listeners.start()
    context = client_context(certs)
    idle = tls_socket(listener, context)
    busy = tls_socket(listener, context)
    try:
        wait_for(lambda: listener.stats().idle_connections == 2)
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert listeners.gate.entered.acquire(timeout=WAIT)
        result: list[bool] = []
        drainer = threading.Thread(target=lambda: result.append(listener.drain(WAIT)))
        drainer.start()
        wait_for(lambda: listener.draining)
        assert closed_by_server(idle)
        with pytest.raises(OSError):
            raw_socket(listener).close()
        listeners.gate.release.set()
        status, headers, body = read_response(busy)
        assert (status, body) == (200, b"slow done\n")
        assert headers["connection"] == "close"
        busy.close()  # as a client does on "Connection: close"; the drain need not wait
        drainer.join(WAIT)
        assert result == [True]
    finally:
        idle.close()
        busy.close()


def test_drain_cuts_off_what_outlasts_the_grace(listeners: Listeners, certs: Certs) -> None:
    listener = listeners.start()
    with tls_socket(listener, client_context(certs)) as busy:
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert listeners.gate.entered.acquire(timeout=WAIT)
        result: list[bool] = []
        drainer = threading.Thread(target=lambda: result.append(listener.drain(0.2)))
        drainer.start()
        assert closed_by_server(busy)
        # The handler itself is waited for: the program must not be torn down under it.
        listeners.gate.release.set()
        drainer.join(WAIT)
    assert result == [False]


# The log.


def test_noise_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    noise = NoiseLog(listener_module.log, burst=3, window=60.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger=listener_module.log.name):
        for n in range(50):
            noise.log(20, "handshake failed", "handshake with %s failed", f"10.0.0.{n}")
        assert len(caplog.records) == 3
        now[0] = 61.0
        noise.log(20, "handshake failed", "handshake with %s failed", "10.0.0.99")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[3] == "47 more 'handshake failed' lines suppressed in the last window"
    assert messages[4] == "handshake with 10.0.0.99 failed"


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="request_timeout"):
        ListenerLimits(request_timeout=0)
    with pytest.raises(ValueError, match="max_threads"):
        ListenerLimits(max_threads=0)
