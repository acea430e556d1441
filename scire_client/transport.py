"""The only place the agent talks to a server: XML-RPC over TLS, with failover.

``ServerTransport`` holds the configured servers in order. A call goes to the
current server; on a network/TLS error or a retryable fault it moves to the
next, and after ``FAILBACK_AFTER`` seconds on a fallback it tries the first
again. Every foreign error leaves this module as a ``TransportError`` or a
``ServerFault`` (``from`` the original), and every answer is checked and
turned into a small typed value.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from xml.parsers.expat import ExpatError

from scire_client.config import ClientConfig
from scire_client.exceptions import ConfigError, ServerFault, TransportError
from scire_server import tls

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FAILBACK_AFTER = 300.0  # seconds on a fallback server before the first is tried again

ENROLLMENT_STATUSES = ("pending", "accepted", "rejected", "revoked")
RECONCILE_ACTIONS = ("cancelled", "expired", "unknown")


@dataclass(frozen=True)
class Registration:
    name: str
    status: str  # pending | accepted (or rejected | revoked)


@dataclass(frozen=True)
class CertificateAnswer:
    status: str  # pending | accepted | rejected | revoked
    certificate: str  # PEM; "" unless accepted


@dataclass(frozen=True)
class Reconcile:
    job_id: int
    action: str  # cancelled | expired | unknown


@dataclass(frozen=True)
class PollAnswer:
    jobs: list[str]  # job XML documents
    reconcile: list[Reconcile]
    poll_interval: int


@dataclass(frozen=True)
class ReportAnswer:
    job_id: int
    state: str
    result: str  # applied | duplicate | ignored


class _TLSTransport(xmlrpc.client.SafeTransport):
    """SafeTransport with our SSL context and a socket timeout.

    The stdlib transport keeps one HTTP/1.1 connection open between calls, so
    a run's many polls and reports reuse one TLS session.
    """

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(context=context)
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout  # read when the socket is opened
        return conn


class ServerTransport:
    """Calls the agent API of the first server that answers.

    ``context`` defaults to one that trusts ``config.ca_path`` and presents the
    agent's certificate when it has one; enrollment passes an unverified one
    (``tls.client_context(None)``) only to fetch the CA, whose fingerprint it
    checks itself.
    """

    def __init__(
        self,
        config: ClientConfig,
        context: ssl.SSLContext | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not config.servers:
            raise ConfigError("no server configured (servers in [client] or --server URL)")
        self._servers = list(config.servers)
        self._context = context if context is not None else _default_context(config)
        self._timeout = config.connect_timeout
        self._clock = clock
        self._current = 0
        self._failed_over_at = 0.0
        self._proxies: dict[str, xmlrpc.client.ServerProxy] = {}

    @property
    def current_server(self) -> str:
        return self._servers[self._current]

    def close(self) -> None:
        for proxy in self._proxies.values():
            proxy("close")()
        self._proxies.clear()

    # The agent API; see "The wire" in docs/ARCHITECTURE.md.

    def ca_certificate(self) -> str:
        answer = self._call("agent.ca_certificate")
        return _expect(answer, str, "agent.ca_certificate")

    def register(self, name: str, csr_pem: str, facts: dict[str, str], token: str) -> Registration:
        answer = _expect(
            self._call("agent.register", name, csr_pem, facts, token), dict, "agent.register"
        )
        status = _field(answer, "status", str, "agent.register")
        # The contract says pending | accepted; a server may also say why not.
        if status not in ENROLLMENT_STATUSES:
            raise TransportError(f"agent.register answered an unknown status {status!r}")
        return Registration(name=_field(answer, "name", str, "agent.register"), status=status)

    def fetch_certificate(self, name: str, csr_pem: str) -> CertificateAnswer:
        method = "agent.fetch_certificate"
        answer = _expect(self._call(method, name, csr_pem), dict, method)
        status = _field(answer, "status", str, method)
        if status not in ENROLLMENT_STATUSES:
            raise TransportError(f"{method} answered an unknown status {status!r}")
        certificate = answer.get("certificate") or ""
        if not isinstance(certificate, str):
            raise TransportError(f"{method} answered a certificate that is not text")
        return CertificateAnswer(status=status, certificate=certificate)

    def poll(self, held: list[int], running: list[int], limit: int) -> PollAnswer:
        answer = _expect(self._call("agent.poll", held, running, limit), dict, "agent.poll")
        jobs = _field(answer, "jobs", list, "agent.poll")
        if not all(isinstance(job, str) for job in jobs):
            raise TransportError("agent.poll answered a job that is not an XML string")
        reconcile = []
        for item in answer.get("reconcile") or []:
            job_id = item.get("job_id") if isinstance(item, dict) else None
            action = item.get("action") if isinstance(item, dict) else None
            if not isinstance(job_id, int) or action not in RECONCILE_ACTIONS:
                raise TransportError(f"agent.poll answered a bad reconcile entry {item!r}")
            reconcile.append(Reconcile(job_id=job_id, action=str(action)))
        interval = answer.get("poll_interval", 0)
        return PollAnswer(
            jobs=jobs,
            reconcile=reconcile,
            poll_interval=interval if isinstance(interval, int) else 0,
        )

    def acknowledge(self, deliveries: list[tuple[int, str]]) -> list[int]:
        """Confirm the spooled deliveries; returns the job ids the server accepted."""
        payload = [{"job_id": job_id, "delivery_id": delivery} for job_id, delivery in deliveries]
        answer = _expect(self._call("agent.acknowledge", payload), dict, "agent.acknowledge")
        acknowledged = _field(answer, "acknowledged", list, "agent.acknowledge")
        if not all(isinstance(job_id, int) for job_id in acknowledged):
            raise TransportError(
                f"agent.acknowledge answered ids that are not integers: {answer!r}"
            )
        return acknowledged

    def report(self, status_xml: str) -> ReportAnswer:
        answer = _expect(self._call("agent.report", status_xml), dict, "agent.report")
        return ReportAnswer(
            job_id=_field(answer, "job_id", int, "agent.report"),
            state=_field(answer, "state", str, "agent.report"),
            result=_field(answer, "result", str, "agent.report"),
        )

    # Failover and error mapping.

    def _call(self, method: str, *args: Any) -> Any:
        if self._current and self._clock() - self._failed_over_at >= FAILBACK_AFTER:
            log.info("server %s: failing back to the first server", self._servers[0])
            self._current = 0
        last: TransportError | ServerFault | None = None
        for _ in range(len(self._servers)):
            url = self._servers[self._current]
            try:
                return self._call_one(url, method, args)
            except TransportError as exc:
                last = exc
            except ServerFault as exc:
                if exc.permanent:
                    raise
                last = exc  # unavailable or internal there: another daemon may do better
            log.warning("%s failed: %s", method, last)
            self._drop_proxy(url)
            if len(self._servers) > 1:
                self._current = (self._current + 1) % len(self._servers)
                self._failed_over_at = self._clock()
                log.info("failing over to server %s", self._servers[self._current])
        assert last is not None
        if isinstance(last, ServerFault):
            raise last
        raise TransportError(f"no server answered {method}: {last}") from last

    def _call_one(self, url: str, method: str, args: tuple[Any, ...]) -> Any:
        proxy = self._proxies.get(url)
        if proxy is None:
            proxy = xmlrpc.client.ServerProxy(
                url, transport=_TLSTransport(self._context, self._timeout), allow_none=True
            )
            self._proxies[url] = proxy
        log.debug("server %s: calling %s", url, method)
        try:
            return getattr(proxy, method)(*args)
        except xmlrpc.client.Fault as exc:
            raise ServerFault(int(exc.faultCode), str(exc.faultString)) from exc
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(
                f"{url}: server certificate not trusted: {exc.verify_message}"
            ) from exc
        except xmlrpc.client.ProtocolError as exc:
            raise TransportError(f"{url}: HTTP {exc.errcode} {exc.errmsg}") from exc
        except (OSError, http.client.HTTPException) as exc:
            # ssl.SSLError, TimeoutError and ConnectionError are all OSErrors.
            raise TransportError(f"{url}: {type(exc).__name__}: {exc}") from exc
        except (xmlrpc.client.ResponseError, ExpatError) as exc:
            raise TransportError(f"{url}: not an XML-RPC answer: {exc}") from exc

    def _drop_proxy(self, url: str) -> None:
        # A failed call may leave a half-read connection: never reuse it.
        proxy = self._proxies.pop(url, None)
        if proxy is not None:
            proxy("close")()


def _default_context(config: ClientConfig) -> ssl.SSLContext:
    cert = config.cert_file if config.cert_file.exists() else None
    key = config.key_file if cert is not None else None
    try:
        return tls.client_context(config.ca_path, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA {config.ca_path} or the agent's key: {exc}") from exc


def _expect(value: object, kind: type[_T], method: str) -> _T:
    if not isinstance(value, kind):
        raise TransportError(f"{method} answered {type(value).__name__}, not {kind.__name__}")
    return value


def _field(answer: dict[str, Any], key: str, kind: type[_T], method: str) -> _T:
    if key not in answer:
        raise TransportError(f"{method} answered without {key!r}")
    return _expect(answer[key], kind, f"{method}[{key!r}]")
