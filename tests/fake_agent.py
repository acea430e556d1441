"""A stand-in for a daemon-mode agent's ``poll_now`` listener, made of the real
parts (``scire_schema.listener`` and ``rpcwire``) with a real client certificate,
so the server's push can be tested before (and apart from) the real daemon.

It records who called and, when told to, holds each call until released, the
way a busy agent would, so that coalescing shows without depending on timing.
"""

from __future__ import annotations

import socket
import threading
import xmlrpc.client
from pathlib import Path

from scire_schema import certs, protocol, tls
from scire_schema.listener import Listener, ListenerLimits
from scire_schema.rpcwire import Call, XMLRPCApp

HOLD_AT_MOST = 30.0  # seconds a held call waits for release, so a failing test cannot hang


class FakeAgent:
    """A TLS XML-RPC listener on 127.0.0.1 answering ``poll_now()`` with True."""

    def __init__(self, cert_file: Path, key_file: Path, ca_file: Path) -> None:
        context = tls.server_context(cert_file, key_file, ca_file)
        self.listener = Listener(
            "127.0.0.1",
            0,
            context,
            XMLRPCApp(self._dispatch),
            ListenerLimits(max_threads=4),
            name="fake-agent",
        )
        self._changed = threading.Condition()
        self.callers: list[str | None] = []  # fingerprints of those who called poll_now
        self.answered = 0
        self._release = threading.Event()
        self._release.set()

    def start(self) -> FakeAgent:
        self.listener.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.listener.drain(1.0)

    @property
    def callback(self) -> str:
        host, port = self.listener.address
        return f"{host}:{port}"

    def hold(self) -> None:
        """From now on each poll_now waits until :meth:`release`."""
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def _dispatch(self, call: Call) -> bool:
        if call.method != protocol.POLL_NOW_METHOD:
            raise xmlrpc.client.Fault(2, f"no method {call.method}")
        with self._changed:
            self.callers.append(call.peer_fingerprint)
            self._changed.notify_all()
        self._release.wait(HOLD_AT_MOST)
        with self._changed:
            self.answered += 1
            self._changed.notify_all()
        return True

    def wait_for_calls(self, count: int, timeout: float = 30.0) -> bool:
        """Whether ``count`` calls have arrived within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.callers) >= count, timeout)

    def wait_for_answers(self, count: int, timeout: float = 30.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.answered >= count, timeout)


class SilentListener:
    """A TCP port that takes connections (the kernel completes them from the
    backlog) and never says a word: an agent that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)

    @property
    def callback(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def close(self) -> None:
        self.sock.close()


def dead_address() -> str:
    """host:port where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def write_identity(
    directory: Path, name: str, cert_pem: bytes, key_pem: bytes
) -> tuple[Path, Path]:
    """The certificate and key files of an identity, for a TLS context."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    return cert_file, key_file


def fingerprint_of(cert_file: Path) -> str:
    return certs.fingerprint(certs.load_cert(cert_file.read_bytes()))
