"""Failover of the agent's ``ServerTransport`` and of ``scire-admin``'s
``ServerConnection``, against tiny real TLS servers on 127.0.0.1: one that
answers, one that accepts and never answers ("hung"), one that reads the call
and never answers ("mute"), one that answers HTTP 503 with Retry-After, one
that answers fault 10 "retry after 1 s", one that closes its kept-alive
connections after each answer, and a port where nothing listens.
"""

from __future__ import annotations

import http.server
import json
import random
import socket
import ssl
import threading
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scire_client.config import ClientConfig
from scire_client.exceptions import RetryLater, ServerFault, TransportError
from scire_client.transport import ServerTransport
from scire_schema import certs as certs_module
from scire_schema import failover, protocol, tls
from scire_schema import files as files_module
from scire_schema.exitcodes import ExitCode
from scire_server import admin_cli
from scire_server import ca as ca_module

TIMEOUT = 1.0  # seconds: the clients' socket timeout, what a hung server costs

POLL_ANSWER = {"jobs": [], "reconcile": [], "poll_interval": 60}


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = ca_module.create_ca()
    files_module.write_public(root / "ca.pem", certs_module.cert_to_pem(ca_cert))
    key = certs_module.generate_key()
    cert = ca_module.issue_certificate(
        ca_key, ca_cert, key.public_key(), "127.0.0.1", ca_module.ROLE_SERVER, ["127.0.0.1"]
    )
    files_module.write_public(root / "server.pem", certs_module.cert_to_pem(cert))
    files_module.write_private(root / "server.key", certs_module.key_to_pem(key))
    return Pki(root / "ca.pem", root / "server.pem", root / "server.key")


class FakeServer:
    """A TLS XML-RPC server of one behaviour (``kind``), counting what it sees."""

    def __init__(self, pki: Pki, kind: str) -> None:
        self.kind = kind
        self.connections = 0  #: TCP connections accepted
        self.calls: list[str] = []  #: methods read
        self._held: list[socket.socket] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.cert, pki.key)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._sock.getsockname()[1]}/"
        self._context = context
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if self.kind == "hung":
                self._held.append(conn)  # accepted, never a byte back
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls_conn = self._context.wrap_socket(conn, server_side=True)
        except OSError:
            conn.close()
            return
        self._held.append(tls_conn)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                params, method = xmlrpc.client.loads(body)
                server.calls.append(method or "")
                server.answer(self, method or "", params)

        try:
            Handler(tls_conn, ("127.0.0.1", 0), None)  # type: ignore[arg-type]
        except OSError:
            pass

    def answer(
        self, handler: http.server.BaseHTTPRequestHandler, method: str, params: tuple[Any, ...]
    ) -> None:
        if self.kind == "mute":
            self._stop.wait()  # read the call, never answer
            return
        if self.kind == "busy":
            handler.send_response(503)
            handler.send_header(protocol.RETRY_AFTER_HEADER.lower(), "1")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if self.kind == "unavailable":
            text = "database unavailable: connection refused; " + protocol.retry_after_text(1)
            body = xmlrpc.client.dumps(
                xmlrpc.client.Fault(int(protocol.FaultCode.UNAVAILABLE), text)
            )
        elif self.kind == "internal":
            body = xmlrpc.client.dumps(xmlrpc.client.Fault(99, "internal error"))
        else:
            result: Any = {"ok": self.url}
            if method == "agent.poll":
                result = POLL_ANSWER
            elif method == "agent.report":
                result = {"job_id": 1, "state": "succeeded", "result": "applied"}
            body = xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True)
        data = body.encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "text/xml")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()
        if self.kind == "closing":
            # As a restarted server does: the kept-alive connection is gone, unannounced.
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join()
        for conn in self._held:
            conn.close()


@pytest.fixture
def servers(pki: Pki) -> Iterator[Callable[[str], FakeServer]]:
    made: list[FakeServer] = []

    def make(kind: str) -> FakeServer:
        made.append(FakeServer(pki, kind))
        return made[-1]

    yield make
    for server in made:
        server.close()


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"https://127.0.0.1:{port}/"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def transport(
    pki: Pki, state_dir: Path, urls: list[str], clock: Clock | None = None, **settings: Any
) -> ServerTransport:
    state_dir.mkdir(exist_ok=True)
    config = ClientConfig.load(
        state_dir=state_dir, servers=urls, connect_timeout=TIMEOUT, **settings
    )
    clock = clock or Clock()
    return ServerTransport(config, tls.client_context(pki.ca), clock=clock, wall_clock=clock)


def remembered(state_dir: Path) -> dict[str, Any]:
    saved: dict[str, Any] = json.loads((state_dir / "server.json").read_text())
    return saved


# --- the agent's transport ----------------------------------------------------------


def test_a_hung_first_server_costs_one_timeout_per_failback_period_not_per_run(
    pki: Pki, servers: Callable[[str], FakeServer], tmp_path: Path
) -> None:
    hung, good = servers("hung"), servers("ok")
    clock = Clock()
    first_run = transport(pki, tmp_path, [hung.url, good.url], clock)
    first_run.poll([], [], 10)
    first_run.close()
    assert hung.connections == 1 and good.calls == ["agent.poll"]
    assert remembered(tmp_path) == {"server": good.url, "failed_over_at": clock.now}

    clock.now += 299
    second_run = transport(pki, tmp_path, [hung.url, good.url], clock)
    second_run.poll([], [], 10)
    second_run.poll([], [], 10)
    second_run.close()
    assert hung.connections == 1, "a run within failback_after started on the hung server"
    assert good.calls == ["agent.poll"] * 3

    clock.now += 2  # failback_after (300 s) since the failover: the first is tried again
    third_run = transport(pki, tmp_path, [hung.url, good.url], clock)
    third_run.poll([], [], 10)
    third_run.close()
    assert hung.connections == 2
    assert remembered(tmp_path) == {"server": good.url, "failed_over_at": clock.now}

    fourth_run = transport(pki, tmp_path, [hung.url, good.url], clock)
    fourth_run.poll([], [], 10)
    fourth_run.close()
    assert hung.connections == 2


def test_failback_to_the_first_server_after_failback_after(
    pki: Pki, servers: Callable[[str], FakeServer], tmp_path: Path
) -> None:
    first, second = servers("ok"), servers("ok")
    clock = Clock()
    (tmp_path / "server.json").write_text(
        json.dumps({"server": second.url, "failed_over_at": clock.now - 10})
    )
    agent = transport(pki, tmp_path, [first.url, second.url], clock, failback_after=60)
    agent.poll([], [], 10)
    assert (first.calls, second.calls) == ([], ["agent.poll"])
    clock.now += 50
    agent.poll([], [], 10)
    assert (first.calls, second.calls) == (["agent.poll"], ["agent.poll"])
    assert agent.current_server == first.url
    assert remembered(tmp_path)["server"] == first.url
    agent.close()


def test_the_remembered_server_is_ignored_when_no_longer_configured(
    pki: Pki, servers: Callable[[str], FakeServer], tmp_path: Path
) -> None:
    first = servers("ok")
    clock = Clock()
    (tmp_path / "server.json").write_text(
        json.dumps({"server": "https://gone.example:8443/", "failed_over_at": clock.now})
    )
    agent = transport(pki, tmp_path, [first.url, dead_url()], clock)
    agent.poll([], [], 10)
    assert first.calls == ["agent.poll"]
    agent.close()


def test_a_503_with_retry_after_moves_on_or_asks_the_caller_to_wait(
    pki: Pki, servers: Callable[[str], FakeServer], tmp_path: Path
) -> None:
    busy, good = servers("busy"), servers("ok")
    agent = transport(pki, tmp_path / "a", [busy.url, good.url])
    assert agent.poll([], [], 10).poll_interval == 60
    assert (busy.calls, good.calls) == (["agent.poll"], ["agent.poll"])
    agent.close()

    alone = transport(pki, tmp_path / "b", [busy.url])
    with pytest.raises(RetryLater) as raised:
        alone.poll([], [], 10)
    assert raised.value.seconds == 1.0
    alone.close()


def test_an_unavailable_fault_with_retry_after_is_a_pause_not_a_fault(
    pki: Pki, servers: Callable[[str], FakeServer], tmp_path: Path
) -> None:
    unavailable, good = servers("unavailable"), servers("ok")
    agent = transport(pki, tmp_path / "a", [unavailable.url, good.url])
    agent.report("<status/>")
    assert good.calls == ["agent.report"]
    agent.close()

    alone = transport(pki, tmp_path / "b", [unavailable.url])
    with pytest.raises(RetryLater) as raised:
        alone.report("<status/>")
    assert raised.value.seconds == 1.0
    alone.close()


def test_an_internal_fault_everywhere_stays_a_fault(
    pki: Pki, servers: Callable[[str], FakeServer], tmp_path: Path
) -> None:
    agent = transport(pki, tmp_path, [servers("internal").url, servers("internal").url])
    with pytest.raises(ServerFault) as raised:
        agent.poll([], [], 10)
    assert raised.value.code == 99
    agent.close()


def test_a_kept_alive_connection_the_server_closed_is_retried_on_a_new_one(
    pki: Pki, servers: Callable[[str], FakeServer], tmp_path: Path
) -> None:
    closing, other = servers("closing"), servers("ok")
    agent = transport(pki, tmp_path, [closing.url, other.url])
    for _ in range(3):
        agent.poll([], [], 10)
    agent.close()
    assert closing.calls == ["agent.poll"] * 3 and closing.connections == 3
    assert other.calls == [], "a closed kept-alive connection caused a failover"
    assert not (tmp_path / "server.json").exists()


def test_no_server_answering_names_every_server_tried(pki: Pki, tmp_path: Path) -> None:
    urls = [dead_url(), dead_url()]
    agent = transport(pki, tmp_path, urls)
    with pytest.raises(TransportError) as raised:
        agent.poll([], [], 10)
    assert all(url in raised.value.message for url in urls)
    assert not isinstance(raised.value, RetryLater)
    agent.close()


def test_failback_after_is_checked(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="failback_after must be more than 0"):
        ClientConfig.load(state_dir=tmp_path, servers=["https://a:1/"], failback_after=0)


# --- the shared pieces --------------------------------------------------------------


def test_backoff_doubles_within_bounds_and_varies() -> None:
    backoff = failover.Backoff(1.0, 8.0, random.Random(1))
    delays = [backoff.next() for _ in range(6)]
    steps = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    assert backoff.active
    backoff.reset()
    assert not backoff.active and 0.5 <= backoff.next() <= 1.0
    others = [failover.Backoff(1.0, 8.0, random.Random(seed)).next() for seed in range(5)]
    assert len(set(others)) == 5, "two agents backing off together wait alike"
    with pytest.raises(ValueError):
        failover.Backoff(0, 1)


def test_retry_after_reads_a_503_header_and_an_unavailable_fault() -> None:
    busy = xmlrpc.client.ProtocolError("h/", 503, "Busy", {"retry-after": "7"})
    assert failover.retry_after(busy) == 7.0
    assert failover.retry_after(xmlrpc.client.ProtocolError("h/", 503, "Busy", {})) is None
    assert failover.retry_after(xmlrpc.client.ProtocolError("h/", 500, "x", {})) is None
    fault = xmlrpc.client.Fault(10, "database unavailable: x; " + protocol.retry_after_text(2.5))
    assert failover.retry_after(fault) == 2.5
    assert failover.retry_after(xmlrpc.client.Fault(99, "retry after 2 s")) is None
    assert 3.0 <= failover.stretch(3.0) <= 3.0 * (1 + failover.RETRY_AFTER_JITTER)


# --- scire-admin ----------------------------------------------------------------------


def admin(pki: Pki, urls: list[str]) -> admin_cli.ServerConnection:
    waits: list[float] = []
    connection = admin_cli.ServerConnection(
        urls, tls.client_context(pki.ca), TIMEOUT, sleep=waits.append
    )
    connection.waits = waits  # type: ignore[attr-defined]
    return connection


def test_admin_fails_over_past_dead_and_hung_servers(
    pki: Pki, servers: Callable[[str], FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    hung, good = servers("hung"), servers("ok")
    connection = admin(pki, [dead_url(), hung.url, good.url])
    assert connection.call("admin.client_accept", "web-17") == {"ok": good.url}
    assert connection.call("admin.job_list") == {"ok": good.url}
    assert hung.connections == 1, "the server that answered was not kept for the command"
    assert capsys.readouterr().err.count(f"using {good.url}") == 1
    connection.close()


def test_admin_does_not_repeat_a_call_that_may_have_been_applied(
    pki: Pki, servers: Callable[[str], FakeServer]
) -> None:
    mute, good = servers("mute"), servers("ok")
    connection = admin(pki, [mute.url, good.url])
    with pytest.raises(admin_cli.ConnectionFailure) as raised:
        connection.call("admin.client_accept", "web-17")
    assert "may have been applied" in str(raised.value) and good.url in str(raised.value)
    assert raised.value.code == ExitCode.UNREACHABLE
    assert good.calls == []
    # A submission carries its request key: the server answers a repeat with the first job.
    assert connection.call("admin.job_submit", {"request_key": "k"}) == {"ok": good.url}
    connection.close()


def test_admin_says_which_servers_it_tried(pki: Pki) -> None:
    urls = [dead_url(), dead_url()]
    connection = admin(pki, urls)
    with pytest.raises(admin_cli.ConnectionFailure) as raised:
        connection.call("admin.job_list")
    assert all(url in str(raised.value) for url in urls)
    assert raised.value.code == ExitCode.UNREACHABLE


def test_admin_waits_out_a_pause_every_server_asks_for_once(
    pki: Pki, servers: Callable[[str], FakeServer]
) -> None:
    busy, unavailable = servers("busy"), servers("unavailable")
    connection = admin(pki, [busy.url, unavailable.url])
    with pytest.raises(admin_cli.CLIError) as raised:
        connection.call("admin.client_accept", "web-17")
    assert "not applied" in str(raised.value) and "retry after 1 s" in str(raised.value)
    assert raised.value.code == ExitCode.UNREACHABLE
    assert len(connection.waits) == 1 and connection.waits[0] >= 1.0  # type: ignore[attr-defined]
    assert busy.calls == unavailable.calls == ["admin.client_accept"] * 2
    connection.close()


def test_admin_config_takes_several_servers(tmp_path: Path) -> None:
    conf = tmp_path / "admin.conf"
    conf.write_text("[admin]\nserver = https://a:8443/, https://b:8443/\n")
    args = admin_cli.build_parser().parse_args(["-c", str(conf), "job", "list"])
    assert admin_cli.admin_config(args).server == ["https://a:8443/", "https://b:8443/"]
    args = admin_cli.build_parser().parse_args(
        ["--server", "https://c:1/,https://d:1/", "--server", "https://e:1/", "job", "list"]
    )
    assert admin_cli.admin_config(args).server == ["https://c:1/", "https://d:1/", "https://e:1/"]
    args = admin_cli.build_parser().parse_args(["--server", "http://c:1/", "job", "list"])
    with pytest.raises(Exception, match="Scire speaks only HTTPS"):
        admin_cli.admin_config(args)
