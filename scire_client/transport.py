"""The only place the agent talks to a server: XML-RPC over TLS, with failover.

``ServerTransport`` holds the configured servers in order. A call goes to the
current server; on a network/TLS error or a retryable fault it moves to the
next, and after ``FAILBACK_AFTER`` seconds on a fallback it tries the first
again. Every foreign error leaves this module as a ``TransportError`` or a
``ServerFault`` (``from`` the original), and every answer is checked and
turned into a small typed value. Job files are decoded here, once: a poll
answer carries each job's ``JobDocument`` with the XML text the spool keeps.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from xml.parsers.expat import ExpatError

from scire_client.config import ClientConfig
from scire_client.exceptions import CertificateExpired, ConfigError, ServerFault, TransportError
from scire_schema import certs, documents, tls, tls_errors
from scire_schema.documents import JobDocument
from scire_schema.errors import CertificateError, DocumentError
from scire_schema.protocol import EnrollmentStatus, FaultCode, ReconcileAction

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FAILBACK_AFTER = 300.0  # seconds on a fallback server before the first is tried again
#: How an older server refuses ``agent.poll`` with ``presence`` (InvalidArgument).
_WRONG_POLL_ARGUMENTS = "wrong arguments for agent.poll"


@dataclass(frozen=True)
class Registration:
    name: str
    status: EnrollmentStatus  # pending | accepted (or rejected | revoked)


@dataclass(frozen=True)
class CertificateAnswer:
    status: EnrollmentStatus
    certificate: str  # PEM; "" unless accepted


@dataclass(frozen=True)
class Reconcile:
    job_id: int
    action: ReconcileAction


@dataclass(frozen=True)
class DeliveredJob:
    """One job file of a poll answer: the text as sent (the spool keeps it) and what it says."""

    xml: str
    doc: JobDocument


@dataclass(frozen=True)
class PollAnswer:
    #: The job files that parsed; one that did not is logged and left out, so it
    #: is not acknowledged: its lease runs out and the server sends it again.
    jobs: list[DeliveredJob]
    reconcile: list[Reconcile]
    poll_interval: int


@dataclass(frozen=True)
class ReportAnswer:
    job_id: int
    state: str
    # A ``protocol.ReportResult`` word; only logged, so a word this agent does
    # not know yet never keeps a delivered report from being marked reported.
    result: str


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
        self._without_presence: set[str] = set()  # servers that refused agent.poll's 4th argument

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
        # The contract says pending | accepted; a server may also say why not.
        status = _status(_field(answer, "status", str, "agent.register"), "agent.register")
        return Registration(name=_field(answer, "name", str, "agent.register"), status=status)

    def fetch_certificate(self, name: str, csr_pem: str) -> CertificateAnswer:
        method = "agent.fetch_certificate"
        answer = _expect(self._call(method, name, csr_pem), dict, method)
        status = _status(_field(answer, "status", str, method), method)
        certificate = answer.get("certificate") or ""
        if not isinstance(certificate, str):
            raise TransportError(f"{method} answered a certificate that is not text")
        return CertificateAnswer(status=status, certificate=certificate)

    def poll(
        self,
        held: list[int],
        running: list[int],
        limit: int,
        presence: dict[str, str] | None = None,
    ) -> PollAnswer:
        """``agent.poll``; ``presence`` goes along unless the server is one that
        refused it before (an older server takes three arguments)."""
        answer = _expect(self._poll(held, running, limit, presence), dict, "agent.poll")
        texts = _field(answer, "jobs", list, "agent.poll")
        if not all(isinstance(text, str) for text in texts):
            raise TransportError("agent.poll answered a job that is not an XML string")
        jobs = []
        for text in texts:
            try:
                jobs.append(DeliveredJob(xml=text, doc=documents.parse_job(text)))
            except DocumentError as exc:
                log.error("a job document from the server was refused: %s", exc)
        reconcile = []
        for item in answer.get("reconcile") or []:
            job_id = item.get("job_id") if isinstance(item, dict) else None
            action = item.get("action") if isinstance(item, dict) else None
            if not isinstance(job_id, int) or action not in set(ReconcileAction):
                raise TransportError(f"agent.poll answered a bad reconcile entry {item!r}")
            reconcile.append(Reconcile(job_id=job_id, action=ReconcileAction(action)))
        interval = answer.get("poll_interval", 0)
        return PollAnswer(
            jobs=jobs,
            reconcile=reconcile,
            poll_interval=interval if isinstance(interval, int) else 0,
        )

    def _poll(
        self, held: list[int], running: list[int], limit: int, presence: dict[str, str] | None
    ) -> Any:
        if presence is None or self.current_server in self._without_presence:
            return self._call("agent.poll", held, running, limit)
        try:
            return self._call("agent.poll", held, running, limit, presence)
        except ServerFault as exc:
            if exc.code != FaultCode.INVALID_ARGUMENT or _WRONG_POLL_ARGUMENTS not in exc.message:
                raise
        # The permanent fault came from the current server: remember it, for this process.
        log.info(
            "server %s: an older server, it takes no presence; polling without it",
            self.current_server,
        )
        self._without_presence.add(self.current_server)
        return self._call("agent.poll", held, running, limit)

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

    def renew_certificate(self, csr_pem: str) -> str:
        """A certificate for the request's key, replacing ours (the PEM text)."""
        method = "agent.renew_certificate"
        answer = _expect(self._call(method, csr_pem), dict, method)
        return _field(answer, "certificate", str, method)

    def reload_identity(self, config: ClientConfig) -> None:
        """Present the certificate now in ``config.cert_file`` from the next call
        on (after a renewal); open connections, made with the old one, are closed."""
        self._context = _default_context(config)
        self.close()

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
                url, transport=tls.TLSTransport(self._context, self._timeout), allow_none=True
            )
            self._proxies[url] = proxy
        log.debug("server %s: calling %s", url, method)
        try:
            return getattr(proxy, method)(*args)
        except xmlrpc.client.Fault as exc:
            raise ServerFault(int(exc.faultCode), str(exc.faultString)) from exc
        except ssl.SSLError as exc:
            raise TransportError(tls_errors.explain_for_agent(exc, url)) from exc
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
    if cert is not None:
        _check_not_expired(cert)
    try:
        return tls.client_context(config.ca_path, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA {config.ca_path} or the agent's key: {exc}") from exc


def _check_not_expired(cert_file: Path) -> None:
    """Say so in words before the server's handshake refuses an expired certificate."""
    try:
        cert = certs.load_cert(cert_file.read_bytes())
    except (OSError, CertificateError) as exc:
        raise ConfigError(f"cannot load the agent's certificate {cert_file}: {exc}") from exc
    if tls.certificate_expired(cert):
        expired = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise CertificateExpired(
            f"your certificate expired on {expired}; renew or re-enroll ({cert_file})"
        )


def _status(value: str, method: str) -> EnrollmentStatus:
    if value not in set(EnrollmentStatus):
        raise TransportError(f"{method} answered an unknown status {value!r}")
    return EnrollmentStatus(value)


def _expect(value: object, kind: type[_T], method: str) -> _T:
    if not isinstance(value, kind):
        raise TransportError(f"{method} answered {type(value).__name__}, not {kind.__name__}")
    return value


def _field(answer: dict[str, Any], key: str, kind: type[_T], method: str) -> _T:
    if key not in answer:
        raise TransportError(f"{method} answered without {key!r}")
    return _expect(answer[key], kind, f"{method}[{key!r}]")
