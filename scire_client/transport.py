"""The only place the agent talks to a server: XML-RPC over TLS, with failover.

``ServerTransport`` holds the configured servers in order. A call goes to the
current server; on a network/TLS error, a retryable fault or a request for a
pause (503 Retry-After, "retry after N s") it moves to the next, and
``failback_after`` seconds after a failover it tries the first again. The
server in use after a failover is kept in the state directory, so the next
normal-mode run starts there. A call that finds a kept-alive connection closed
by the server is sent once more at once, on a new connection. When every
server asks for a pause the call raises ``RetryLater``; when none answers,
``TransportError``; the caller backs off (``scire_schema.failover.Backoff``). Every foreign error leaves this module as a ``TransportError`` or a
``ServerFault`` (``from`` the original), and every answer is checked and
turned into a small typed value. Job files are decoded here, once: a poll
answer carries each job's ``JobDocument`` with the XML text the spool keeps.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import ssl
import time
import xmlrpc.client
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from xml.parsers.expat import ExpatError

from scire_client.config import ClientConfig
from scire_client.exceptions import (
    CertificateExpired,
    ConfigError,
    RetryLater,
    ServerFault,
    TransportError,
)
from scire_schema import certs, documents, failover, files, tls, tls_errors
from scire_schema.documents import JobDocument
from scire_schema.errors import CertificateError, DocumentError
from scire_schema.protocol import (
    EnrollmentStatus,
    FaultCode,
    ReconcileAction,
    format_time,
    retry_after_text,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

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


@dataclass(frozen=True)
class Acknowledgement:
    #: The job ids the server accepted (the agent keeps them).
    acknowledged: list[int]
    #: Of those, the ones it marked running because the agent said it started them.
    started: list[int]


class ServerTransport:
    """Calls the agent API of the first server that answers.

    ``context`` defaults to one that trusts ``config.ca_path`` and presents the
    agent's certificate when it has one; enrollment passes an unverified one
    (``tls.client_context(None)``) only to fetch the CA, whose fingerprint it
    checks itself. With ``remember``, the server in use after a failover is kept
    in ``config.server_state_file`` for the next process.
    """

    def __init__(
        self,
        config: ClientConfig,
        context: ssl.SSLContext | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        remember: bool = True,
    ) -> None:
        if not config.servers:
            raise ConfigError("no server configured (servers in [client] or --server URL)")
        self._servers = list(config.servers)
        self._context = context if context is not None else _default_context(config)
        self._timeout = config.connect_timeout
        self._failback_after = config.failback_after
        self._clock = clock
        self._wall_clock = wall_clock
        self._current = 0
        self._failed_over_at = 0.0  # on self._clock
        self._failed_over_wall = 0.0  # the same moment on the wall clock, for the state file
        self._all_down = False  # the last call found no server: log the change once
        self._state_file = config.server_state_file if remember else None
        self._remembered: tuple[str, float] | None = None  # what the state file says
        self._proxies: dict[str, tuple[failover.SingleTryTransport, xmlrpc.client.ServerProxy]] = {}
        self._without_presence: set[str] = set()  # servers that refused agent.poll's 4th argument
        self._without_report_many: set[str] = set()  # servers without agent.report_many
        self._recall()

    @property
    def current_server(self) -> str:
        return self._servers[self._current]

    def close(self) -> None:
        for transport, _ in self._proxies.values():
            transport.close()
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
        presence: Mapping[str, str | bool] | None = None,
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
        self,
        held: list[int],
        running: list[int],
        limit: int,
        presence: Mapping[str, str | bool] | None,
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

    def acknowledge(
        self,
        deliveries: list[tuple[int, str]],
        started: Mapping[int, dt.datetime] | None = None,
    ) -> Acknowledgement:
        """Confirm the spooled deliveries; those in ``started`` (job id: start
        time) the agent starts at once, and the acknowledgement says so instead
        of a ``running`` report after it."""
        started = started or {}
        payload = []
        for job_id, delivery in deliveries:
            item = {"job_id": job_id, "delivery_id": delivery}
            if job_id in started:
                item["started"] = format_time(started[job_id])
            payload.append(item)
        method = "agent.acknowledge"
        answer = _expect(self._call(method, payload), dict, method)
        acknowledged = _field(answer, "acknowledged", list, method)
        # An older server starts nothing: it says no "started", and the agent reports running.
        running = answer.get("started", [])
        if not isinstance(running, list) or not all(
            isinstance(job_id, int) for job_id in acknowledged + running
        ):
            raise TransportError(f"{method} answered ids that are not integers: {answer!r}")
        return Acknowledgement(acknowledged=acknowledged, started=running)

    def report(self, status_xml: str) -> ReportAnswer:
        answer = _expect(self._call("agent.report", status_xml), dict, "agent.report")
        return _report_answer(answer, "agent.report")

    def report_many(self, status_xmls: list[str]) -> list[ReportAnswer | ServerFault]:
        """Several status reports in one call (at most ``REPORTS_PER_CALL_MAX``):
        per report, the server's answer or the fault that refused it alone. A
        server without ``agent.report_many`` gets them one by one."""
        method = "agent.report_many"
        if self.current_server not in self._without_report_many:
            try:
                answer = _expect(self._call(method, status_xmls), dict, method)
            except ServerFault as exc:
                if exc.code != FaultCode.FORBIDDEN or f"no method {method}" not in exc.message:
                    raise
                log.info(
                    "server %s: an older server, without %s; reporting one by one",
                    self.current_server,
                    method,
                )
                self._without_report_many.add(self.current_server)
            else:
                results = _field(answer, "results", list, method)
                if len(results) != len(status_xmls):
                    raise TransportError(
                        f"{method} answered {len(results)} results for {len(status_xmls)} reports"
                    )
                return [_report_outcome(result, method) for result in results]
        outcomes: list[ReportAnswer | ServerFault] = []
        for status_xml in status_xmls:
            try:
                outcomes.append(self.report(status_xml))
            except RetryLater:
                raise
            except ServerFault as exc:
                outcomes.append(exc)
        return outcomes

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
        start = self._current
        if start and self._clock() - self._failed_over_at >= self._failback_after:
            log.info(
                "server %s: %g s (failback_after) on %s: trying the first server again",
                self._servers[0],
                self._failback_after,
                self._servers[start],
            )
            start = 0
        failures: list[str] = []  # each names its server and says what went wrong
        pauses = 0
        pause: float | None = None
        fault: ServerFault | None = None
        for step in range(len(self._servers)):
            index = (start + step) % len(self._servers)
            url = self._servers[index]
            try:
                answer = self._call_one(url, method, args)
            except _Pause as exc:
                pause = exc.seconds if pause is None else min(pause, exc.seconds)
                pauses += 1
                failures.append(f"server {url} asks for a pause ({exc})")
            except TransportError as exc:
                # ``_call_one`` starts the message with the URL; once is enough.
                why = exc.message.removeprefix(f"{url}: ")
                failures.append(f"server {url} unreachable ({why})")
            except ServerFault as exc:
                if exc.permanent:
                    # It answered: the call itself is refused.
                    self._arrived(index, failures, pauses == len(failures))
                    raise
                fault = exc  # unavailable or internal there: another daemon may do better
                failures.append(f"server {url} failed ({exc.message})")
            else:
                self._arrived(index, failures, pauses == len(failures))
                return answer
            self._drop_proxy(url)
        tried = "; ".join(failures)
        if not self._all_down:
            self._all_down = True
            # A pause asked for is no failure: the caller waits, as told.
            level = logging.INFO if pause is not None else logging.WARNING
            log.log(level, "no server answers %s: %s", method, tried)
        if pause is not None:
            raise RetryLater(f"{method}: {tried}", pause)
        if fault is not None:
            raise fault
        raise TransportError(f"no server answered {method}: {tried}")

    def _arrived(self, index: int, failures: list[str], only_pauses: bool) -> None:
        """Server ``index`` answered after ``failures``: log a change of server
        (one line per change, not per call) and remember it for the next run.
        Servers that only asked for a pause are no failure: that line is INFO."""
        url = self._servers[index]
        was = self._servers[self._current]
        if failures and (index != self._current or self._all_down):
            level = logging.INFO if only_pauses else logging.WARNING
            log.log(level, "%s; using %s", "; ".join(failures), url)
        elif failures:
            # A failback try that failed again: one line per failback_after.
            log.info("%s; staying on %s", "; ".join(failures), url)
        elif index != self._current or self._all_down:
            log.info("server %s answers; using it", url)
        self._all_down = False
        if index != 0 and (index != self._current or failures):
            self._failed_over_at = self._clock()
            self._failed_over_wall = self._wall_clock()
        self._current = index
        if url != was or failures:
            self._remember()

    def _recall(self) -> None:
        """Start on the server the last run failed over to, until ``failback_after``
        has passed since: a hung first server then costs one timeout per
        failback period, not one per run."""
        if self._state_file is None:
            return
        try:
            saved = json.loads(self._state_file.read_text(encoding="utf-8"))
            url = saved["server"]
            since = float(saved["failed_over_at"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: not read, starting on the first server: %s", self._state_file, exc)
            return
        if url not in self._servers or url == self._servers[0]:
            return
        age = self._wall_clock() - since
        if not 0 <= age < self._failback_after:
            return  # due for failback (or the clock went back: trust the first server)
        self._current = self._servers.index(url)
        self._failed_over_at = self._clock() - age
        self._failed_over_wall = since
        self._remembered = (url, since)
        log.info(
            "server %s: using it, as since the failover %.0f s ago (the first server is "
            "tried again %g s after it)",
            url,
            age,
            self._failback_after,
        )

    def _remember(self) -> None:
        if self._state_file is None or not self._state_file.parent.is_dir():
            return  # before enrollment made the state directory: nothing to keep yet
        url = self._servers[self._current]
        since = self._failed_over_wall if self._current else 0.0
        if (url, since) == self._remembered:
            return
        data = json.dumps({"server": url, "failed_over_at": since}) + "\n"
        try:
            files.write_atomic(self._state_file, data.encode(), 0o644)
        except OSError as exc:
            log.warning("%s: cannot record the server in use: %s", self._state_file, exc)
            return
        self._remembered = (url, since)

    def _call_one(self, url: str, method: str, args: tuple[Any, ...]) -> Any:
        transport, proxy = self._connection(url)
        reused = transport.connected
        log.debug("server %s: calling %s", url, method)
        try:
            try:
                return getattr(proxy, method)(*args)
            except (OSError, http.client.HTTPException) as exc:
                if not (reused and failover.stale_connection(exc)):
                    raise
                # The server closed the kept-alive connection since the last call
                # (it restarted, or dropped it as idle): one more try at once, on a
                # new connection, before failing over. Safe for every agent call,
                # because each may reach the server twice: register answers a key
                # already on record with its status, poll and fetch_certificate
                # change nothing a repeat would undo (an unacknowledged delivery
                # comes again, under its delivery id), acknowledge names delivery
                # ids, and a second report of a job is a "duplicate" (scire_server
                # api.py and store/assignments.py).
                log.info("server %s closed the connection (%s); calling again", url, exc)
            return getattr(proxy, method)(*args)
        except xmlrpc.client.Fault as exc:
            seconds = failover.retry_after(exc)
            if seconds is not None:
                raise _Pause(seconds, str(exc.faultString)) from exc
            raise ServerFault(int(exc.faultCode), str(exc.faultString)) from exc
        except ssl.SSLError as exc:
            raise TransportError(tls_errors.explain_for_agent(exc, url)) from exc
        except xmlrpc.client.ProtocolError as exc:
            seconds = failover.retry_after(exc)
            if seconds is not None:
                raise _Pause(seconds) from exc
            raise TransportError(f"{url}: HTTP {exc.errcode} {exc.errmsg}") from exc
        except (OSError, http.client.HTTPException) as exc:
            # ssl.SSLError, TimeoutError and ConnectionError are all OSErrors.
            raise TransportError(f"{url}: {type(exc).__name__}: {exc}") from exc
        except (xmlrpc.client.ResponseError, ExpatError) as exc:
            raise TransportError(f"{url}: not an XML-RPC answer: {exc}") from exc

    def _connection(
        self, url: str
    ) -> tuple[failover.SingleTryTransport, xmlrpc.client.ServerProxy]:
        pair = self._proxies.get(url)
        if pair is None:
            transport = failover.SingleTryTransport(self._context, self._timeout)
            pair = (transport, xmlrpc.client.ServerProxy(url, transport=transport, allow_none=True))
            self._proxies[url] = pair
        return pair

    def _drop_proxy(self, url: str) -> None:
        # A failed call may leave a half-read connection: never reuse it.
        pair = self._proxies.pop(url, None)
        if pair is not None:
            pair[0].close()


class _Pause(Exception):
    """One server asked for a pause of ``seconds``; ``_call`` tries the others."""

    def __init__(self, seconds: float, words: str = "") -> None:
        # The server's own words say why ("database unavailable: ...; retry after 5 s").
        super().__init__(words or f"busy, {retry_after_text(seconds)}")
        self.seconds = seconds


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


def _report_answer(answer: dict[str, Any], method: str) -> ReportAnswer:
    return ReportAnswer(
        job_id=_field(answer, "job_id", int, method),
        state=_field(answer, "state", str, method),
        result=_field(answer, "result", str, method),
    )


def _report_outcome(result: Any, method: str) -> ReportAnswer | ServerFault:
    """One entry of ``agent.report_many``'s answer: a report's answer, or its fault."""
    result = _expect(result, dict, method)
    if "fault" in result:
        code = _field(result, "fault", int, method)
        return ServerFault(code, str(result.get("message", "")))
    return _report_answer(result, method)
