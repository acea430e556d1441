"""The attacks of issue 7, each against a real server while a real agent keeps
completing jobs.

One deployment serves every attack in turn (module scope). For each attack the
test starts the hostile peers, submits a job with ``scire-admin`` while they
are at it, and requires the job to finish (60 s bound; the time is measured
and printed, not asserted). Afterwards the server is still up, its log holds
no traceback, the agent never failed a run, every hostile peer got the answer
it should, and the database holds nothing new but the submitted job. The
server's peak RSS during each attack (``VmHWM``, reset before it) and the job's
submit-to-done time are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import abc
import socket
import ssl
import threading
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import Deployment
from hostile import (
    WAIT,
    Answer,
    Peer,
    Worker,
    anonymous_context,
    assert_stable_fault,
    attacker_address,
    database_snapshot,
    job_latency,
    log_problems,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    server_alive,
    snapshot_difference,
)

from scire_schema import certs
from scire_schema.listener import MAX_ANONYMOUS_BODY_BYTES
from scire_schema.protocol import FaultCode

MALFORMED = FaultCode.MALFORMED_REQUEST.value
MAX_MESSAGE = 200  # characters: a malformed request's fault names what was wrong, briefly
HOST = "worker"


@dataclass
class Site:
    """The shared deployment, its agent, and what each attack measured."""

    dep: Deployment
    worker: Worker
    pid: int
    baseline_rss_mib: float
    results: list[tuple[str, float, float]] = field(default_factory=list)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, xprocess: Any) -> Iterator[Site]:
    dep = Deployment(tmp_path_factory.mktemp("attacks"), xprocess)
    pid = dep.start_server()
    dep.enroll(HOST)
    worker = Worker(dep, HOST)
    worker.start()
    site = Site(dep, worker, pid, rss_mib(pid))
    try:
        reset_peak_rss(pid)
        _, latency = job_latency(dep, HOST, "warmup")
        site.results.append(("no attack (warm-up job)", latency, peak_rss_mib(pid)))
        yield site
    finally:
        worker.stop()
        dep.stop_server()
        print(f"\nserver RSS before the attacks: {site.baseline_rss_mib:.1f} MiB")
        print(f"{'attack':<28} {'job submit->done':>18} {'server peak RSS':>16}")
        for name, latency, peak in site.results:
            print(f"{name:<28} {latency:>16.2f} s {peak:>12.1f} MiB")


# --- the attacks ---------------------------------------------------------------------


class Attack(abc.ABC):
    """Hostile peers started before the probe job and stopped after it."""

    @abc.abstractmethod
    def start(self, dep: Deployment) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def problems(self) -> list[str]:
        """What the peers saw that they should not have."""
        return []


class HeldConnections(Attack):
    """``count`` connections opened and held; any the server drops (handshake
    deadline) is opened again, so the pressure lasts as long as the attack."""

    def __init__(self, count: int, addresses: int, handshake: bool) -> None:
        self.count, self.addresses, self.handshake = count, addresses, handshake
        self.sockets: list[socket.socket] = []
        self.opened = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self, dep: Deployment, index: int) -> socket.socket:
        source = attacker_address(index % self.addresses)
        raw = socket.create_connection(("127.0.0.1", dep.port), WAIT, (source, 0))
        self.opened += 1
        if not self.handshake:
            return raw
        return anonymous_context(dep).wrap_socket(raw, server_hostname="127.0.0.1")

    def start(self, dep: Deployment) -> None:
        self.sockets = [self._open(dep, i) for i in range(self.count)]
        self._thread = threading.Thread(target=self._keep_open, args=(dep,), daemon=True)
        self._thread.start()

    def _keep_open(self, dep: Deployment) -> None:
        while not self._stop.wait(0.5):
            for i, sock in enumerate(self.sockets):
                if _closed_by_peer(sock):
                    sock.close()
                    self.sockets[i] = self._open(dep, i)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WAIT)
        for sock in self.sockets:
            sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(0.0)
            return sock.recv(1) == b""
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


class SlowDrip(Attack):
    """``count`` peers each sending a valid request one byte per second."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.request = _http_request(xmlrpc.client.dumps((), "agent.ca_certificate").encode())
        self.answers: list[bytes] = []
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, dep: Deployment) -> None:
        for i in range(self.count):
            thread = threading.Thread(target=self._drip, args=(dep, i), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _drip(self, dep: Deployment, index: int) -> None:
        raw = socket.create_connection(("127.0.0.1", dep.port), WAIT, (attacker_address(2), 0))
        with anonymous_context(dep).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            for byte in self.request:
                if self._stop.wait(1.0):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # the request deadline closed it: what should happen
                    self.answers.append(_read_head(sock))
                    return
                self.bytes_sent += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)

    def problems(self) -> list[str]:
        # A request this slow never completes: at most its deadline's 408.
        return [
            f"a slow request got {head!r}" for head in self.answers if head and b" 408 " not in head
        ]


class HostileRequests(Attack):
    """``threads`` peers posting the same hostile bodies over and over; each
    answer must pass ``expect``."""

    def __init__(
        self,
        bodies: list[bytes],
        expect: Callable[[bytes, Answer], None],
        threads: int = 4,
    ) -> None:
        self.bodies, self.expect, self.threads = bodies, expect, threads
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self, dep: Deployment) -> None:
        for i in range(self.threads):
            thread = threading.Thread(target=self._post, args=(dep, i), daemon=True)
            thread.start()
            self._workers.append(thread)

    def _post(self, dep: Deployment, index: int) -> None:
        peer = Peer(dep, anonymous_context(dep), attacker_address(3 + index))
        try:
            while not self._stop.is_set():
                for body in self.bodies:
                    try:
                        answer = peer.post(body)
                    except OSError:  # reset, broken pipe, or TLS cut mid-body
                        if len(body) <= MAX_ANONYMOUS_BODY_BYTES:
                            raise
                        # Refused unread: the 413 came while the body was still going out.
                        peer.close()
                        self.sent += 1
                        continue
                    self.sent += 1
                    try:
                        self.expect(body, answer)
                    except AssertionError as exc:
                        self.failures.append(str(exc)[:500])
        except (OSError, ValueError) as exc:
            self.failures.append(f"connection failed: {exc!r}")
        finally:
            peer.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(WAIT * 2)

    def problems(self) -> list[str]:
        return self.failures[:5] + ([] if self.sent else ["no hostile request was answered"])


class Oversize(Attack):
    """Peers announcing a 64 MiB body with ``Expect: 100-continue``: the answer
    must be ``413`` at once, never ``100 Continue`` first."""

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self.heads: list[bytes] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self, dep: Deployment) -> None:
        for i in range(self.threads):
            thread = threading.Thread(target=self._announce, args=(dep, i), daemon=True)
            thread.start()
            self._workers.append(thread)

    def _announce(self, dep: Deployment, index: int) -> None:
        head = (
            b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Content-Length: 67108864\r\nExpect: 100-continue\r\n\r\n"
        )
        while not self._stop.is_set():
            raw = socket.create_connection(
                ("127.0.0.1", dep.port), WAIT, (attacker_address(5 + index), 0)
            )
            with anonymous_context(dep).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(head)
                self.heads.append(_read_head(sock))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(WAIT)

    def problems(self) -> list[str]:
        wrong = [h for h in self.heads if not h.startswith(b"HTTP/1.1 413 ")]
        return [f"answer to an oversize body: {h[:200]!r}" for h in wrong[:5]] + (
            [] if self.heads else ["no oversize request was answered"]
        )


def _http_request(body: bytes) -> bytes:
    return (
        b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _read_head(sock: socket.socket) -> bytes:
    """The first answer's status line and headers (empty when the peer just closed)."""
    data = b""
    sock.settimeout(WAIT)
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.split(b"\r\n\r\n", 1)[0]


# --- hostile bodies and what they must get ------------------------------------------


def billion_laughs() -> bytes:
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    ]
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE methodCall [{"".join(entities)}]>\n'
        "<methodCall><methodName>&lol9;</methodName><params/></methodCall>"
    ).encode()


def entity_call(method: str, params: tuple[Any, ...]) -> bytes:
    """A call whose method name is an internal entity: a parser that expands
    entities would run ``method``."""
    body = xmlrpc.client.dumps(params, "PLACEHOLDER")
    body = body.replace("<?xml version='1.0'?>", "")
    body = body.replace("<methodName>PLACEHOLDER</methodName>", "<methodName>&nm;</methodName>")
    return f'<?xml version="1.0"?>\n<!DOCTYPE m [<!ENTITY nm "{method}">]>{body}'.encode()


def external_entity() -> bytes:
    return (
        b'<?xml version="1.0"?>\n<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
        b"<methodCall><methodName>agent.register</methodName><params><param><value>"
        b"<string>&x;</string></value></param></params></methodCall>"
    )


def nested_arrays(depth: int) -> bytes:
    return (
        b"<?xml version='1.0'?><methodCall><methodName>agent.poll</methodName><params><param>"
        + b"<value><array><data>" * depth
        + b"</data></array></value>" * depth
        + b"</param></params></methodCall>"
    )


def call_with_string(text: str) -> bytes:
    """A call carrying ``text`` raw, as ``xmlrpc.client`` would send it."""
    return xmlrpc.client.dumps((text,), "agent.ca_certificate").encode()


def scalar_call(tag: str, text: str) -> bytes:
    return (
        f"<?xml version='1.0'?><methodCall><methodName>agent.poll</methodName><params><param>"
        f"<value><{tag}>{text}</{tag}></value></param></params></methodCall>"
    ).encode()


MALFORMED_BODIES = [
    call_with_string("colours \x1b[31mred\x1b[0m"),  # ESC: ANSI colours in a script
    call_with_string("nul \x00 byte"),
    b"",
    b"<methodCall><methodName>agent.poll</methodName",  # cut off
    b"not xml at all",
    b"<methodCall><methodName>agent.poll</methodName><params><param><value><i4>1",
    "<methodCall><methodName>agent.poll</methodName></methodCall>".encode("utf-16"),
    b"<?xml version='1.0'?><methodCall><methodName>\xff\xfe</methodName></methodCall>",
    scalar_call("i4", "12x"),
    scalar_call("int", "\u0661\u0662"),  # Arabic-Indic digits: int() would take them
    scalar_call("boolean", "2"),
    scalar_call("i4", str(2**31)),  # over 32 bits, as in 'held'
    scalar_call("double", "nan"),
    scalar_call("base64", "!!!"),
    scalar_call("dateTime.iso8601", "yesterday"),
    b"<?xml version='1.0'?><?evil instruction?><methodCall><methodName>x</methodName></methodCall>",
    b"<methodCall><methodName>agent.poll</methodName><params><param><value><struct>"
    b"<member><name>a</name><value>1</value></member>"
    b"<member><name>a</name><value>2</value></member></struct></value></param></params>"
    b"</methodCall>",
    b"<methodCall><methodName>agent.poll</methodName><bogus/></methodCall>",
]


def expect_malformed(body: bytes, answer: Answer) -> None:
    """Fault 12 with a short message in words, never fault 1 or Python's text."""
    assert_stable_fault(answer, body)
    assert answer.fault_code == MALFORMED, (body[:80], answer.fault_code, answer.fault_string)
    assert len(answer.fault_string) <= MAX_MESSAGE, answer.fault_string


def expect_malformed_or_too_large(body: bytes, answer: Answer) -> None:
    """A stranger's body over its cap is refused unread (413); a smaller one is
    parsed with bounded depth and refused as malformed."""
    if len(body) > MAX_ANONYMOUS_BODY_BYTES:
        assert answer.status == 413, answer
    else:
        expect_malformed(body, answer)


def attacks() -> dict[str, Callable[[], Attack]]:
    csr = certs.make_csr(certs.generate_key(), "entity-probe").decode()
    return {
        "200 idle TLS connections": lambda: HeldConnections(200, addresses=8, handshake=True),
        "200 raw TCP, no handshake": lambda: HeldConnections(200, addresses=4, handshake=False),
        "20 slow-drip requests": lambda: SlowDrip(20),
        "billion laughs": lambda: HostileRequests([billion_laughs()], expect_malformed, 16),
        "internal and external entities": lambda: HostileRequests(
            [
                entity_call("agent.ca_certificate", ()),
                entity_call("agent.register", ("entity-probe", csr, {}, "")),
                external_entity(),
            ],
            expect_malformed,
        ),
        "oversize body": lambda: Oversize(),
        "200,000 nested arrays": lambda: HostileRequests(
            [nested_arrays(200_000), nested_arrays(1_000)], expect_malformed_or_too_large, 2
        ),
        "malformed, ESC and NUL bodies": lambda: HostileRequests(
            MALFORMED_BODIES, expect_malformed
        ),
    }


ATTACKS = attacks()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_changes_nothing_and_jobs_still_complete(site: Site, name: str) -> None:
    dep, pid = site.dep, site.pid
    before = database_snapshot(dep)
    agent_failures = len(site.worker.failures)
    attack = ATTACKS[name]()
    reset_peak_rss(pid)

    attack.start(dep)
    try:
        job_id, latency = job_latency(dep, HOST, "probe", timeout=60)
    finally:
        attack.stop()
    peak = peak_rss_mib(pid)
    site.results.append((name, latency, peak))
    print(f"\n{name}: job {job_id} submit->done {latency:.2f} s; server peak RSS {peak:.1f} MiB")

    assert attack.problems() == []
    assert server_alive(pid)
    assert log_problems(dep.server_log()) == []
    assert site.worker.failures[agent_failures:] == []
    assert snapshot_difference(before, database_snapshot(dep, {job_id})) == {}
