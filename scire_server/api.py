"""The remote methods: who the caller is, argument checks, one store call,
and the answer.

A call comes down once and goes back once: ``rpc.py`` (listener, audiences,
errors to faults) → :class:`RemoteMethods` (identifies the caller, records
refusals, checks arguments, signs certificates) → one store transaction →
back here, where job files are rendered after the transaction has committed
→ ``rpc.py``. The methods get the caller as their first argument and never
trust an identity passed in the arguments.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import secrets
import xmlrpc.client
from collections.abc import Callable
from typing import Any, Protocol

from cryptography import x509

from scire_schema import certs, documents, protocol
from scire_schema.errors import SchemaError
from scire_server import ca, recurrence
from scire_server.config import ServerConfig
from scire_server.exceptions import (
    AuthenticationRequired,
    Conflict,
    DatabaseUnreachable,
    Forbidden,
    InvalidArgument,
    InvalidDocument,
    NotFound,
    ScireError,
    Unavailable,
    bound,
    clip,
    from_schema_error,
)
from scire_server.identities import KnownCallers
from scire_server.poll_cache import IdleClients
from scire_server.presence import LastSeen, is_online, parse_presence
from scire_server.refusals import AnonymousRefusals
from scire_server.states import FINAL, JOB_SUMMARIES, ClientStatus
from scire_server.store import Caller, Certificate, JobSpec, Store, utcnow
from scire_server.store.assignments import APPLIED
from scire_server.work_due import WorkDue

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
PRIVILEGE_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
# A client-generated key that makes a submission idempotent: a UUID fits.
REQUEST_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{7,63}$")
MAX_SCRIPT_BYTES = 1024 * 1024
# An output byte becomes up to 4 bytes in the status document (U+FFFD for a
# byte that is not UTF-8, then base64): 2 MiB keeps it and the XML-RPC envelope
# under their caps.
MAX_OUTPUT_LIMIT = 2 * 1024 * 1024
FINAL_STATES = frozenset(state.value for state in FINAL)
#: Keys of ``job_submit`` that only a schedule (``at``, ``every``, ``cron``) takes.
SCHEDULE_ONLY_KEYS = ("timezone", "catch_up", "allow_overlap")


def check_name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidArgument(
            f"{what} {clip(value)} is not valid: "
            "use letters, digits, '.', '_' and '-' (at most 255)"
        )
    return value


def _csr(value: Any) -> x509.CertificateSigningRequest:
    """A certificate request sent as PEM text (enrollment and renewal)."""
    if not isinstance(value, str):
        raise InvalidArgument("csr_pem must be a PEM string")
    try:
        return certs.load_csr(value)
    except SchemaError as exc:
        raise from_schema_error(exc) from exc


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{what} must be an integer from {low} to {high}, not {clip(value)}")
    return value


def _script(value: Any) -> str:
    """The script of a submission: a string, or ``Binary`` UTF-8 bytes (what
    ``scire-admin`` sends, since an XML-RPC string loses ``\r`` and cannot carry ESC)."""
    if isinstance(value, xmlrpc.client.Binary):
        value = value.data
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"the script is not UTF-8 text (byte {exc.start})") from exc
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument("the job needs a script")
    if "\x00" in value:
        raise InvalidArgument("the script contains a NUL character")
    return value


def _time(value: Any, what: str) -> dt.datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be an ISO 8601 time")
    try:
        return protocol.parse_time(value)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: {clip(value)} is not an ISO 8601 time") from exc


def _status(value: Any) -> documents.StatusReport:
    if not isinstance(value, str):
        raise InvalidDocument("the status report must be an XML string")
    try:
        return documents.parse_status(value)
    except SchemaError as exc:
        raise from_schema_error(exc) from exc


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise InvalidArgument(f"{what} must be a list of job ids")
    if len(value) > 10_000:
        raise InvalidArgument(f"{what} holds too many ids")
    return value


class DispatchObserver(Protocol):
    """Hears what the agents' calls did (``monitoring.ServerMetrics`` counts it)."""

    def polled(self, sent: int, denied: int) -> None: ...

    def acknowledged(self, count: int) -> None: ...

    def reported(self, state: str) -> None: ...


class _Unobserved:
    def polled(self, sent: int, denied: int) -> None:
        pass

    def acknowledged(self, count: int) -> None:
        pass

    def reported(self, state: str) -> None:
        pass


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class RemoteMethods:
    """The remote methods, and who may call each (``open``, ``agent``, ``user``, ``admin``)."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        work_due: WorkDue | None = None,
        on_presence_change: Callable[[str], None] | None = None,
        observer: DispatchObserver | None = None,
    ) -> None:
        """``work_due`` hears of the clients a submission or a rerun gave work;
        ``on_presence_change`` is told the name of a client whose agent changed
        its version, mode or callback (the pusher forgets where it listened);
        ``observer`` of each poll, acknowledgement and applied report."""
        self.config = config
        self.store = store
        self.work_due = work_due or WorkDue()
        self.on_presence_change = on_presence_change
        self.observer: DispatchObserver = observer or _Unobserved()
        self.last_seen = LastSeen()
        #: Callers that may call, by fingerprint; forgotten on every change of standing.
        self.known_callers = KnownCallers()
        #: Told after this daemon changed a certificate's standing (the relay
        #: tells the other daemons to forget theirs).
        self.on_identities_changed: Callable[[], None] | None = None
        #: Clients whose empty poll is answered from memory (``poll_cache``); it
        #: hears every announcement, this daemon's and, relayed, the others'.
        self.idle_clients = IdleClients(utcnow)
        if config.poll_cache_check > 0:
            self.work_due.subscribe(self.idle_clients)
        self.ca_cert = certs.load_cert(config.ca_cert_file.read_bytes())
        self.ca_key = certs.load_key(config.ca_key_file.read_bytes())
        self.ca_pem = certs.cert_to_pem(self.ca_cert).decode()
        self.anonymous_refusals = AnonymousRefusals()
        self._names = frozenset(self.table())

    def table(self) -> dict[str, tuple[str, Callable[..., Any]]]:
        """Remote name -> (who may call it, the function)."""
        table: dict[str, tuple[str, Callable[..., Any]]] = {
            "agent.ca_certificate": ("open", self.ca_certificate),
            "agent.register": ("open", self.register),
            "agent.fetch_certificate": ("open", self.fetch_certificate),
            "agent.poll": ("agent", self.poll),
            "agent.acknowledge": ("agent", self.acknowledge),
            "agent.report": ("agent", self.report),
            "agent.report_many": ("agent", self.report_many),
            "agent.renew_certificate": ("agent", self.renew_certificate),
            "admin.whoami": ("user", self.whoami),
            "admin.renew_certificate": ("user", self.renew_certificate),
            "admin.job_submit": ("user", self.job_submit),
            "admin.job_list": ("user", self.job_list),
            "admin.job_show": ("user", self.job_show),
            "admin.job_cancel": ("user", self.job_cancel),
            "admin.job_retry": ("user", self.job_retry),
            "admin.job_output": ("user", self.job_output),
            "admin.client_list": ("user", self.client_list),
            "admin.grant_list": ("user", self.grant_list),
            "admin.schedule_list": ("user", self.schedule_list),
            "admin.schedule_show": ("user", self.schedule_show),
            "admin.schedule_pause": ("user", self.schedule_pause),
            "admin.schedule_resume": ("user", self.schedule_resume),
            "admin.schedule_delete": ("user", self.schedule_delete),
        }
        for name in (
            "client_show client_accept client_reject client_revoke client_delete client_token "
            "group_create group_delete group_add group_remove group_list "
            "user_add user_list user_revoke grant_add grant_remove audit server_list"
        ).split():
            table[f"admin.{name}"] = ("admin", getattr(self, name))
        return table

    # --- the caller -------------------------------------------------------------

    def identify(self, fingerprint: str | None) -> Caller:
        """The caller presenting the certificate with this fingerprint, or the
        refusal: no or an unknown certificate, a revoked or unaccepted identity."""
        if fingerprint is None:
            raise AuthenticationRequired(
                "this method needs a client certificate; without one only agent.register, "
                "agent.fetch_certificate and agent.ca_certificate are open"
            )
        known = self.known_callers.get(fingerprint)
        if known is not None:
            return known
        generation = self.known_callers.generation()
        caller, why = self.store.directory.caller_by_fingerprint(fingerprint)
        if caller is not None and not why:
            self.known_callers.remember(fingerprint, caller, generation)
        if why:
            # Named in the error, so the refusal is logged and audited as itself.
            raise Forbidden(f"certificate refused: {why}", identity=caller)
        if caller is None:
            raise AuthenticationRequired("certificate not known to this server")
        return caller

    def identities_changed(self) -> None:
        """A certificate's standing changed (committed): forget what this daemon
        knows of callers, and have the others forget theirs."""
        self.known_callers.forget_all()
        if self.on_identities_changed is not None:
            self.on_identities_changed()

    def record_refusal(
        self, method: str, caller: Caller | None, peer: str, exc: ScireError
    ) -> None:
        """Log a refused call and write its audit row, under the caller or the
        refused identity the error names (not for ``Unavailable``: a busy
        database would only be made busier). A refusal without a known identity
        is only counted (:class:`refusals.AnonymousRefusals`): its first from
        each address per interval is logged, the rest summed up by
        :meth:`summarize_refusals`."""
        if isinstance(exc, DatabaseUnreachable):
            return  # the store logs an outage once, not once per call
        who = caller or exc.identity
        what = method if method in self._names else clip(method)
        if who is None:
            if self.anonymous_refusals.note(peer):
                log.warning(
                    "anonymous@%s refused %s: %s (fault %d); further anonymous refusals "
                    "from %s are counted, not logged, until the next summary",
                    peer,
                    what,
                    exc.message,
                    exc.code,
                    peer,
                )
            return
        log.warning("%s refused %s: %s (fault %d)", who.actor, what, exc.message, exc.code)
        if isinstance(exc, Unavailable):
            return
        try:
            self.store.audit.record(
                who.actor,
                "refused",
                client=who.name if who.kind == "client" else None,
                job_id=exc.job_id,
                detail=bound(f"{what}: fault {exc.code}: {exc.message}", 2000),
            )
        except ScireError:
            log.warning("could not record the refusal of %s by %s", what, who.actor)

    def summarize_refusals(self) -> None:
        """Log and audit (one ``anonymous_refusals`` row) the anonymous refusals
        counted since the last summary; nothing when there were none."""
        summary = self.anonymous_refusals.take()
        if summary is None:
            return
        log.warning("%s", summary.text())
        try:
            self.store.audit.record("anonymous", "anonymous_refusals", detail=summary.text())
        except ScireError as exc:
            log.warning("could not record the anonymous refusals: %s", exc.message)

    def check_idle_clients(self) -> int:
        """The poll cache's safety check: forget the clients the database says
        have due work; returns how many had missed their signal."""
        return self.idle_clients.check(self.store.sweeps.clients_with_due_work())

    def flush_last_seen(self) -> int:
        """Write the last-seen times noted since the last flush (one transaction);
        kept for the next flush when the database is unavailable."""
        batch = self.last_seen.take()
        try:
            return self.store.directory.record_last_seen(batch)
        except ScireError:
            self.last_seen.give_back(batch)
            raise

    # --- open: enrollment ----------------------------------------------------

    def ca_certificate(self, _caller: None) -> str:
        return self.ca_pem

    def register(
        self, _caller: None, name: Any, csr_pem: Any, facts: Any = None, token: Any = ""
    ) -> dict[str, Any]:
        name = check_name(name, "client name")
        csr = _csr(csr_pem)
        if certs.common_name(csr) != name:
            raise InvalidArgument(
                f"the request's common name {clip(certs.common_name(csr))} is not {name!r}"
            )
        facts = facts if isinstance(facts, dict) else {}
        facts = {str(k)[:64]: str(v)[:255] for k, v in list(facts.items())[:50]}
        digest = token_hash(token) if isinstance(token, str) and token else None
        key = certs.key_fingerprint(csr)
        # Signed before the store's transaction, so the token is spent in the
        # same transaction that stores the certificate, or not at all.
        certificate = self._sign_client(name, csr_pem) if digest else None
        status = self.store.directory.register_client(
            name, csr_pem, facts, digest, certificate, key_fingerprint=key
        )
        if certificate is not None:
            self.identities_changed()  # a re-enrollment may replace a certificate
        log.info("client %s: enrollment request for key %s, status %s", name, key, status)
        return {"name": name, "status": status}

    def _sign_client(self, name: str, csr_pem: str) -> Certificate:
        cert = ca.sign_csr(self.ca_key, self.ca_cert, csr_pem, name, ca.ROLE_CLIENT)
        return Certificate(csr_pem, certs.cert_to_pem(cert).decode(), certs.fingerprint(cert))

    def fetch_certificate(self, _caller: None, name: Any, csr_pem: Any) -> dict[str, Any]:
        name = check_name(name, "client name")
        try:
            row = self.store.directory.enrollment(name)
        except NotFound:
            row = None
        # Only the holder of the request learns its answer; anyone else gets
        # the same fault whether or not the name exists, so it tells no names.
        if row is None or row["csr_pem"] != csr_pem:
            raise NotFound("no enrollment request with this key under this name")
        accepted = row["status"] == ClientStatus.ACCEPTED
        return {"status": row["status"], "certificate": row["cert_pem"] if accepted else ""}

    # --- agent ----------------------------------------------------------------

    def poll(
        self,
        caller: Caller,
        held: Any = None,
        running: Any = None,
        limit: Any = 10,
        presence: Any = None,
    ) -> dict[str, Any]:
        answer = self.poll_from_memory(caller, held, running, limit, presence)
        if answer is not None:
            return answer
        held_ids = _ids(held or [], "held")
        running_ids = _ids(running or [], "running")
        limit = _int(limit, "limit", 0, self.config.poll_batch_max)
        said = parse_presence(presence)
        # In memory only: written in batches by the timed flush, not by each poll.
        self.last_seen.note(caller.name, utcnow())
        cached = self._may_cache(held, running, presence)
        self.idle_clients.went_to_database()
        generation = self.idle_clients.generation()
        result = self.store.assignments.poll(
            caller, held_ids, running_ids, limit, self.config.ack_timeout, said
        )
        if (
            cached
            and limit > 0
            and not (result.deliveries or result.reconcile or result.requeued or result.denied)
        ):
            self.idle_clients.mark_idle(
                caller.name, generation, self.store.assignments.next_start(caller), said
            )
        if result.presence_changed:
            log.info(
                "client %s: agent %s in %s mode, callback %s",
                caller.name,
                said.version or "(version not said)",
                said.mode or "(mode not said)",
                (said.callback or "none") if said.callback is not None else "(not said)",
            )
            if self.on_presence_change is not None:
                self.on_presence_change(caller.name)
        if result.requeued:
            self.work_due.announce([caller.name])
        self.observer.polled(len(result.deliveries), result.denied)
        # Rendered after the claim has committed: never under the write lock.
        return {
            "jobs": [documents.render_job(job) for job in result.deliveries],
            "reconcile": result.reconcile,
            "poll_interval": self.config.poll_interval,
        }

    def _may_cache(self, held: Any, running: Any, presence: Any) -> bool:
        """Whether this poll may be answered from, and mark a client in, the
        poll cache: it is on, the agent holds and runs nothing, and poll_now
        did not ask for it (the push may come from another daemon before the
        relay has told this one: that poll reads the database)."""
        woken = isinstance(presence, dict) and presence.get(protocol.WOKEN) is True
        return self.config.poll_cache_check > 0 and not held and not running and not woken

    def poll_from_memory(
        self,
        caller: Caller,
        held: Any = None,
        running: Any = None,
        limit: Any = 10,
        presence: Any = None,
    ) -> dict[str, Any] | None:
        """The answer to the empty poll of an idle client, from memory, or None
        when the poll needs the database (or its arguments need a closer look,
        which :meth:`poll` gives them). Never blocks: ``rpc`` calls it on the
        listener's event loop."""
        if not self._may_cache(held, running, presence):
            return None
        try:
            _int(limit, "limit", 0, self.config.poll_batch_max)
            said = parse_presence(presence)
        except ScireError:
            return None
        if not self.idle_clients.is_idle(caller.name, said):
            return None
        self.last_seen.note(caller.name, utcnow())
        self.observer.polled(0, 0)
        return {"jobs": [], "reconcile": [], "poll_interval": self.config.poll_interval}

    def acknowledge(self, caller: Caller, deliveries: Any) -> dict[str, Any]:
        if not isinstance(deliveries, list):
            raise InvalidArgument("deliveries must be a list of {job_id, delivery_id}")
        if len(deliveries) > self.config.poll_batch_max:
            raise InvalidArgument(
                f"at most {self.config.poll_batch_max} deliveries per acknowledgement"
            )
        pairs = []
        started: dict[int, dt.datetime] = {}
        for item in deliveries:
            if not isinstance(item, dict) or not isinstance(item.get("delivery_id"), str):
                raise InvalidArgument("each delivery needs job_id and delivery_id")
            job_id = _int(item.get("job_id"), "job_id", 1, 2**31 - 1)
            pairs.append((job_id, item["delivery_id"]))
            when = _time(item.get("started"), "started")
            if when is not None:
                started[job_id] = when
        self.last_seen.note(caller.name, utcnow())
        done = self.store.assignments.acknowledge(caller, pairs, started)
        # Kept ids include repeats of an acknowledgement already counted; close enough
        # for a rate, and the assignment counts (scire_assignments) are exact.
        self.observer.acknowledged(len(done.kept))
        for _ in done.started:
            self.observer.reported(protocol.ReportedState.RUNNING.value)
        return {"acknowledged": done.kept, "started": done.started}

    def report(self, caller: Caller, status_xml: Any) -> dict[str, Any]:
        report = _status(status_xml)
        self.last_seen.note(caller.name, utcnow())
        result = self.store.assignments.report(caller, report)
        if result == APPLIED:
            self.observer.reported(report.state)
        return {"job_id": report.job_id, "state": report.state, "result": result}

    def report_many(self, caller: Caller, status_xmls: Any) -> dict[str, Any]:
        """Several status reports in one call and one transaction; each answered
        as ``agent.report`` would, or with the fault that refused it alone."""
        if not isinstance(status_xmls, list) or not status_xmls:
            raise InvalidArgument("reports must be a non-empty list of status XML strings")
        if len(status_xmls) > protocol.REPORTS_PER_CALL_MAX:
            raise InvalidArgument(f"at most {protocol.REPORTS_PER_CALL_MAX} reports per call")
        answers: list[dict[str, Any] | None] = [None] * len(status_xmls)
        parsed: list[tuple[int, documents.StatusReport]] = []
        for index, text in enumerate(status_xmls):
            try:
                parsed.append((index, _status(text)))
            except ScireError as exc:
                self.record_refusal("agent.report_many", caller, "", exc)
                answers[index] = {"fault": exc.code, "message": exc.message}
        self.last_seen.note(caller.name, utcnow())
        outcomes = self.store.assignments.report_many(caller, [report for _, report in parsed])
        for (index, report), outcome in zip(parsed, outcomes, strict=True):
            if isinstance(outcome, ScireError):
                self.record_refusal("agent.report_many", caller, "", outcome)
                answers[index] = {
                    "job_id": report.job_id,
                    "fault": outcome.code,
                    "message": outcome.message,
                }
                continue
            if outcome == APPLIED:
                self.observer.reported(report.state)
            answers[index] = {"job_id": report.job_id, "state": report.state, "result": outcome}
        return {"results": answers}

    # --- agent and user: renewal ------------------------------------------------

    def renew_certificate(self, caller: Caller, csr_pem: Any) -> dict[str, Any]:
        """A new certificate for the caller's own name and the request's key,
        replacing the one the call came with (docs/SECURITY.md, "Renewal")."""
        csr = _csr(csr_pem)
        if certs.common_name(csr) != caller.name:
            raise InvalidArgument(
                f"the request's common name {clip(certs.common_name(csr))} is not "
                f"{caller.name!r}: a certificate is renewed only for its own holder"
            )
        role = ca.ROLE_CLIENT if caller.kind == "client" else ca.ROLE_USER
        try:
            cert = ca.sign_csr(self.ca_key, self.ca_cert, csr_pem, caller.name, role)
        except SchemaError as exc:
            raise from_schema_error(exc) from exc
        cert_pem = certs.cert_to_pem(cert).decode()
        fingerprint = certs.fingerprint(cert)
        replaced = self.store.directory.renew_certificate(
            caller, Certificate(csr_pem, cert_pem, fingerprint), certs.key_fingerprint(csr)
        )
        self.identities_changed()  # the old certificate is refused from now on
        expires = cert.not_valid_after_utc
        log.info(
            "%s: certificate renewed: %s replaces %s, valid until %s",
            caller.actor,
            fingerprint,
            replaced,
            protocol.format_time(expires),
        )
        if caller.kind == "client" and self.on_presence_change is not None:
            # The pusher pins the fingerprint on record: it must not keep the old one.
            self.on_presence_change(caller.name)
        return {
            "name": caller.name,
            "certificate": cert_pem,
            "ca": self.ca_pem,
            "fingerprint": fingerprint,
            "expires": protocol.format_time(expires),
        }

    # --- admin: jobs ------------------------------------------------------------

    def whoami(self, caller: Caller) -> dict[str, Any]:
        return {"name": caller.name, "is_admin": caller.is_admin}

    def job_submit(self, caller: Caller, spec: Any) -> dict[str, Any]:
        if not isinstance(spec, dict):
            raise InvalidArgument("job_submit takes one struct")
        script = _script(spec.get("script"))
        if len(script.encode("utf-8")) > MAX_SCRIPT_BYTES:
            raise InvalidArgument(f"the script is larger than {MAX_SCRIPT_BYTES} bytes")
        hosts = [check_name(h, "client") for h in spec.get("hosts") or []]
        groups = [check_name(g, "client group") for g in spec.get("groups") or []]
        if not hosts and not groups:
            raise InvalidArgument("the job needs at least one host or group")
        privilege = spec.get("privilege") or "run"
        if not isinstance(privilege, str) or not PRIVILEGE_RE.match(privilege) or privilege == "*":
            raise InvalidArgument(f"privilege {clip(privilege)} is not valid")
        request_key = spec.get("request_key") or None
        if request_key is not None and (
            not isinstance(request_key, str) or not REQUEST_KEY_RE.match(request_key)
        ):
            raise InvalidArgument(
                f"request_key {clip(request_key)} is not valid: 8 to 64 letters, digits, "
                "'.', '_', ':' or '-', starting with a letter or digit (a UUID fits)"
            )
        interpreter = spec.get("interpreter") or ""
        if not isinstance(interpreter, str) or not (
            interpreter == "" or interpreter.startswith("/")
        ):
            raise InvalidArgument("the interpreter must be an absolute path")
        if not interpreter and not script.startswith("#!"):
            interpreter = self.config.default_interpreter
        # Otherwise "": the agent runs the script by its shebang line.
        not_before = _time(spec.get("not_before"), "not_before")
        expires = _time(spec.get("expires"), "expires")
        if not_before and expires and expires <= not_before:
            raise InvalidArgument("expires must be after not_before")
        c = self.config
        job = JobSpec(
            name=check_name(spec.get("name") or "job", "job name"),
            script=script,
            interpreter=interpreter,
            privilege=privilege,
            priority=_int(spec.get("priority", 0), "priority", -1000, 1000),
            timeout=_int(spec.get("timeout") or c.default_timeout, "timeout", 1, 7 * 86400),
            output_limit=_int(
                spec.get("output_limit") or c.default_output_limit,
                "output_limit",
                1,
                MAX_OUTPUT_LIMIT,
            ),
            max_attempts=_int(
                spec.get("max_attempts") or c.default_max_attempts, "max_attempts", 1, 100
            ),
            not_before=not_before,
            expires_at=expires,
            rerun_on_agent_crash=bool(spec.get("rerun_on_agent_crash", False)),
        )
        kinds = [k for k in protocol.ScheduleKind if spec.get(k.value) not in (None, "")]
        if kinds:
            return self._schedule_submit(caller, spec, kinds, job, hosts, groups, request_key)
        for key in SCHEDULE_ONLY_KEYS:
            if spec.get(key) not in (None, "", False):
                raise InvalidArgument(f"{key} is for schedules: give it with at, every or cron")
        result = self.store.jobs.submit(caller, job, hosts, groups, request_key)
        # After the commit; a job that may not start yet is announced by nobody:
        # the agents' polls find it when it is due. This daemon's poll cache
        # learns its start now; the others' from their safety check once it is due.
        if not result.repeated and (not_before is None or not_before <= utcnow()):
            self.work_due.announce(result.accepted)
        elif not result.repeated:
            self.idle_clients.forget(result.accepted)
        return {
            "job_id": result.job_id,
            "accepted": result.accepted,
            "refused": result.refused,
            "repeated": result.repeated,
        }

    def _schedule_submit(
        self,
        caller: Caller,
        spec: dict[str, Any],
        kinds: list[protocol.ScheduleKind],
        job: JobSpec,
        hosts: list[str],
        groups: list[str],
        request_key: str | None,
    ) -> dict[str, Any]:
        """``job_submit`` with ``at``, ``every`` or ``cron``: a schedule, not a job."""
        if len(kinds) > 1:
            raise InvalidArgument(
                f"give one of at, every and cron, not {' and '.join(k.value for k in kinds)}"
            )
        (kind,) = kinds
        if job.not_before or job.expires_at:
            raise InvalidArgument(
                "not_before and expires are for a single job; a schedule's runs have neither"
            )
        timezone = spec.get("timezone") or recurrence.DEFAULT_TIMEZONE
        catch_up = spec.get("catch_up") or protocol.CatchUp.ONCE.value
        if catch_up not in tuple(protocol.CatchUp):
            raise InvalidArgument(f"catch_up {clip(catch_up)} is not one of once, all, skip")
        value = spec[kind.value]
        if kind == protocol.ScheduleKind.EVERY and isinstance(value, int):
            value = str(value)  # seconds
        if not isinstance(value, str) or not isinstance(timezone, str):
            raise InvalidArgument(f"{kind.value} and timezone must be strings")
        try:
            when = recurrence.Recurrence.from_request(kind, value, timezone, protocol.utc_now())
        except recurrence.RecurrenceError as exc:
            raise InvalidArgument(f"{kind.value}: {exc}") from exc
        result = self.store.schedules.create(
            caller,
            job,
            hosts,
            groups,
            when,
            allow_overlap=bool(spec.get("allow_overlap", False)),
            catch_up=protocol.CatchUp(catch_up),
            request_key=request_key,
        )
        return {
            "schedule_id": result.schedule_id,
            "when": when.describe(),
            "next_due_at": result.next_due_at,
            "accepted": result.accepted,
            "refused": result.refused,
            "repeated": result.repeated,
        }

    def job_list(
        self, caller: Caller, limit: Any = 50, state: Any = "", before: Any = 0
    ) -> list[dict[str, Any]]:
        if state and state not in JOB_SUMMARIES:
            raise InvalidArgument(f"state {state!r} is not one of {', '.join(JOB_SUMMARIES)}")
        cursor = _int(before, "before", 0, 2**31 - 1) or None
        return self.store.jobs.listing(
            caller, _int(limit, "limit", 1, 10_000), state or None, cursor
        )

    def job_show(self, caller: Caller, job_id: Any) -> dict[str, Any]:
        detail = self.store.jobs.detail(caller, _int(job_id, "job id", 1, 2**31 - 1))
        # A script or output may hold characters an XML-RPC string cannot carry
        # (ESC); shown with U+FFFD in their place, kept exact in the database.
        detail["script"] = documents.xml_safe(detail["script"])
        for assignment in detail["assignments"]:
            if assignment.get("output") is not None:
                assignment["output"] = documents.xml_safe(assignment["output"])
        return detail

    def job_output(self, caller: Caller, job_id: Any, host: Any, offset: Any = 0) -> dict[str, Any]:
        """The output one host has sent for a job, from character ``offset`` on:
        live while it runs, final once it ended. ``start`` is where ``text``
        begins: 0 rather than ``offset`` when the stored output is shorter than
        ``offset`` (a new attempt began again), so a follower starts over."""
        job_id = _int(job_id, "job id", 1, 2**31 - 1)
        host = check_name(host, "host")
        offset = _int(offset, "offset", 0, 2**31 - 1)
        assignment = self.store.jobs.host_result(caller, job_id, host)
        output = assignment.get("output") or ""
        start = offset if offset <= len(output) else 0
        return {
            "job_id": job_id,
            "client": host,
            "state": assignment["state"],
            "final": assignment["state"] in FINAL_STATES,
            "attempt": assignment["attempt"],
            "exit_code": assignment["exit_code"],
            "reason": assignment["reason"],
            "start": start,
            "length": len(output),
            "text": documents.xml_safe(output[start:]),
            "truncated": bool(assignment.get("output_truncated")),
        }

    def job_cancel(self, caller: Caller, job_id: Any) -> dict[str, Any]:
        job = _int(job_id, "job id", 1, 2**31 - 1)
        count = self.store.jobs.cancel(caller, job)
        if count:
            # Work changed for its clients: the push wakes their agents to learn
            # the cancel at once (their poll's reconcile), the relay tells the
            # other daemons (their caches of who may have work).
            try:
                self.work_due.announce(self.store.jobs.clients_of(job))
            except ScireError as exc:  # cancelled all the same; the agents' polls learn it
                log.warning("job %s cancelled, its agents not woken: %s", job, exc.message)
        return {"job_id": job_id, "cancelled": count}

    def job_retry(self, caller: Caller, job_id: Any, hosts: Any = None) -> dict[str, Any]:
        """Re-queue a finished job's failed and timed-out hosts (``hosts``: only
        these) as a new attempt; their agents are told there is work."""
        if hosts is not None and not isinstance(hosts, list):
            raise InvalidArgument("hosts must be a list of client names")
        names = [check_name(h, "client") for h in hosts or []]
        result = self.store.jobs.retry(caller, _int(job_id, "job id", 1, 2**31 - 1), names)
        self.work_due.announce(result.retried)
        return {"job_id": result.job_id, "retried": result.retried, "refused": result.refused}

    # --- admin: schedules ---------------------------------------------------------

    def schedule_list(self, caller: Caller, include_all: Any = False) -> list[dict[str, Any]]:
        return self.store.schedules.listing(caller, bool(include_all))

    def schedule_show(self, caller: Caller, schedule_id: Any) -> dict[str, Any]:
        detail = self.store.schedules.detail(caller, _int(schedule_id, "schedule id", 1, 2**31 - 1))
        detail["script"] = documents.xml_safe(detail["script"])
        return detail

    def schedule_pause(self, caller: Caller, schedule_id: Any) -> dict[str, Any]:
        return self.store.schedules.pause(caller, _int(schedule_id, "schedule id", 1, 2**31 - 1))

    def schedule_resume(self, caller: Caller, schedule_id: Any) -> dict[str, Any]:
        return self.store.schedules.resume(caller, _int(schedule_id, "schedule id", 1, 2**31 - 1))

    def schedule_delete(self, caller: Caller, schedule_id: Any) -> dict[str, Any]:
        return self.store.schedules.delete(caller, _int(schedule_id, "schedule id", 1, 2**31 - 1))

    # --- admin: clients -----------------------------------------------------------

    def client_list(
        self, caller: Caller, group: Any = "", offline: Any = False
    ) -> list[dict[str, Any]]:
        """Every client with its presence; ``group``: only the clients in that
        client group (nested groups included); ``offline``: only accepted
        clients that are offline."""
        if not isinstance(offline, bool):
            raise InvalidArgument(f"offline must be a boolean, not {clip(offline)}")
        if group in ("", None):
            group_name = None
        elif isinstance(group, str):
            group_name = check_name(group.removeprefix("@"), "client group")
        else:
            raise InvalidArgument(f"group must be a client group's name, not {clip(group)}")
        rows = [self._with_presence(row) for row in self.store.directory.clients(group_name)]
        if offline:
            rows = [r for r in rows if r["status"] == ClientStatus.ACCEPTED and not r["online"]]
        return rows

    def client_show(self, caller: Caller, name: Any) -> dict[str, Any]:
        return self._with_presence(self.store.directory.client_detail(check_name(name)))

    def _with_presence(self, row: dict[str, Any]) -> dict[str, Any]:
        """A client row with the freshest last-seen time (this daemon's memory may
        be ahead of the database until the next flush) and ``online``."""
        noted = self.last_seen.latest(row["name"])
        if noted is not None and (row["last_seen_at"] is None or row["last_seen_at"] < noted):
            row["last_seen_at"] = noted
        row["online"] = row["status"] == ClientStatus.ACCEPTED and is_online(
            row["last_seen_at"],
            utcnow(),
            self.config.poll_interval,
            self.config.offline_after_polls,
        )
        return row

    def client_accept(self, caller: Caller, name: Any, fingerprint: Any = "") -> dict[str, Any]:
        row = self.store.directory.enrollment(check_name(name))
        if fingerprint:
            if not isinstance(fingerprint, str):
                raise InvalidArgument("fingerprint must be a SHA-256 hex digest")
            try:
                wanted = certs.parse_fingerprint(fingerprint)
            except SchemaError as exc:
                raise InvalidArgument(f"fingerprint {clip(fingerprint)}: {exc.message}") from exc
            # The operator compared the agent's key with this one: accept that
            # key only, never another request that took the name meanwhile.
            if row["key_fingerprint"] != wanted:
                raise Conflict(
                    f"the request of {name} carries key {row['key_fingerprint']}, not {wanted}; "
                    "nothing accepted"
                )
        if row["status"] == ClientStatus.ACCEPTED:
            return {"name": name, "status": "accepted"}
        if row["status"] != ClientStatus.PENDING:
            raise InvalidArgument(f"client {name} is {row['status']}, not pending")
        # Signed first; the acceptance is then one transaction.
        certificate = self._sign_client(name, row["csr_pem"])
        self.store.directory.accept_client(name, certificate, caller.actor)
        return {"name": name, "status": "accepted"}

    def client_reject(self, caller: Caller, name: Any) -> dict[str, Any]:
        self.store.directory.reject_client(check_name(name), caller.actor)
        self.identities_changed()
        return {"name": name, "status": "rejected"}

    def client_revoke(self, caller: Caller, name: Any) -> dict[str, Any]:
        self.store.directory.revoke_client(check_name(name), caller.actor)
        self.identities_changed()
        return {"name": name, "status": "revoked"}

    def client_delete(self, caller: Caller, name: Any) -> dict[str, Any]:
        self.store.directory.delete_client(check_name(name), caller.actor)
        self.identities_changed()
        return {"name": name, "status": "deleted"}

    def client_token(self, caller: Caller, uses: Any = 1, ttl: Any = 0) -> dict[str, Any]:
        uses = _int(uses, "uses", 1, 100_000)
        ttl = _int(ttl or self.config.token_ttl, "ttl", 60, 365 * 86400)
        # Hex, not base64url: a token that starts with "-" reads as an option
        # on the command line (scire-client --token TOKEN), 1 time in 64.
        token = secrets.token_hex(24)
        expires = self.store.directory.add_token(token_hash(token), ttl, uses, caller.actor)
        return {
            "token": token,
            "uses": uses,
            "expires": expires,
            "ca_fingerprint": certs.fingerprint(self.ca_cert),
        }

    # --- admin: groups, users, grants ------------------------------------------------

    @staticmethod
    def _kind(kind: Any) -> str:
        if kind not in ("client", "user"):
            raise InvalidArgument("group kind must be 'client' or 'user'")
        return str(kind)

    def group_create(self, caller: Caller, kind: Any, name: Any) -> dict[str, Any]:
        self.store.directory.create_group(self._kind(kind), check_name(name, "group"), caller.actor)
        return {"kind": kind, "name": name}

    def group_delete(self, caller: Caller, kind: Any, name: Any) -> dict[str, Any]:
        self.store.directory.delete_group(self._kind(kind), check_name(name, "group"), caller.actor)
        return {"kind": kind, "name": name}

    def _member(
        self, caller: Caller, kind: Any, group: Any, member: Any, add: bool
    ) -> dict[str, Any]:
        if not isinstance(member, str):
            raise InvalidArgument("member must be a name, or @group for a nested client group")
        prefix = "@" if member.startswith("@") else ""
        change = self.store.directory.add_member if add else self.store.directory.remove_member
        change(
            self._kind(kind),
            check_name(group, "group"),
            prefix + check_name(member.removeprefix("@"), "member"),
            caller.actor,
        )
        return {"kind": kind, "group": group, "member": member}

    def group_add(self, caller: Caller, kind: Any, group: Any, member: Any) -> dict[str, Any]:
        return self._member(caller, kind, group, member, True)

    def group_remove(self, caller: Caller, kind: Any, group: Any, member: Any) -> dict[str, Any]:
        return self._member(caller, kind, group, member, False)

    def group_list(self, caller: Caller, kind: Any) -> list[dict[str, Any]]:
        return self.store.directory.groups(self._kind(kind))

    def user_add(
        self, caller: Caller, name: Any, csr_pem: Any, is_admin: Any = False
    ) -> dict[str, Any]:
        name = check_name(name, "user name")
        if not isinstance(csr_pem, str):
            raise InvalidArgument("csr_pem must be a PEM string")
        cert = self.issue_user(name, csr_pem)
        self.store.directory.add_user(name, certs.fingerprint(cert), bool(is_admin), caller.actor)
        return {"name": name, "certificate": certs.cert_to_pem(cert).decode(), "ca": self.ca_pem}

    def issue_user(self, name: str, csr_pem: str) -> x509.Certificate:
        try:
            return ca.sign_csr(self.ca_key, self.ca_cert, csr_pem, name, ca.ROLE_USER)
        except SchemaError as exc:
            raise from_schema_error(exc) from exc

    def user_list(self, caller: Caller) -> list[dict[str, Any]]:
        return self.store.directory.users()

    def user_revoke(self, caller: Caller, name: Any) -> dict[str, Any]:
        name = check_name(name, "user name")
        if name == caller.name:
            raise InvalidArgument("you cannot revoke yourself")
        self.store.directory.revoke_user(name, caller.actor)
        self.identities_changed()
        return {"name": name, "status": "revoked"}

    def grant_add(
        self, caller: Caller, subject: Any, privilege: Any, target: Any
    ) -> dict[str, Any]:
        for value, what in ((subject, "subject"), (target, "target")):
            if not isinstance(value, str):
                raise InvalidArgument(f"{what} must be a name or @group")
            check_name(value.removeprefix("@"), what)
        if not isinstance(privilege, str) or not PRIVILEGE_RE.match(privilege):
            raise InvalidArgument(f"privilege {clip(privilege)} is not valid")
        grant_id = self.store.directory.add_grant(subject, privilege, target, caller.actor)
        return {"id": grant_id, "subject": subject, "privilege": privilege, "target": target}

    def grant_remove(self, caller: Caller, grant_id: Any) -> dict[str, Any]:
        self.store.directory.remove_grant(_int(grant_id, "grant id", 1, 2**31 - 1), caller.actor)
        return {"id": grant_id}

    def grant_list(self, caller: Caller) -> list[dict[str, Any]]:
        """Every grant for an administrator; a user sees the grants that apply to them."""
        grants = self.store.directory.grants()
        if caller.is_admin:
            return grants
        # User groups do not nest, so direct membership is all there is.
        mine = {caller.name} | {
            f"@{g['name']}"
            for g in self.store.directory.groups("user")
            if caller.name in g["members"]
        }
        return [g for g in grants if g["subject"] in mine]

    def audit(
        self, caller: Caller, job_id: Any = 0, client: Any = "", limit: Any = 100
    ) -> list[dict[str, Any]]:
        return self.store.audit.events(
            _int(job_id, "job id", 0, 2**31 - 1) or None,
            check_name(client, "client") if client else None,
            _int(limit, "limit", 1, 100_000),
        )

    def server_list(self, caller: Caller) -> list[dict[str, Any]]:
        return self.store.servers.listing()
