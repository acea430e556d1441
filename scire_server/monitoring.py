"""What a scraper and a load balancer see: ``/metrics`` and ``/healthz``.

Both answer on the TLS port (the listener hands every non-RPC path here),
and, when ``metrics_listen`` is set, on a plain-HTTP address of their own:

* ``/healthz``: anyone, with or without a certificate. 200 ``ok`` when the
  database answers and the daemon is not shutting down, else 503 with the
  reason in a few fixed words; the driver's own message goes to the log only.
  Probes closer together than ``HEALTH_PROBE_INTERVAL`` share one answer.
* ``/metrics``: on the TLS port, a Scire user's certificate (any active user;
  ``scire-admin user add prometheus`` makes one for a scraper), since the
  numbers describe the fleet; on the plain address, anyone who can reach it
  (meant for 127.0.0.1).

The counts of assignments and clients come from one store query, cached for
``metrics_refresh`` seconds: however often a scraper asks, the database sees
that query at most once per interval. When it fails, the last counts stay
and ``scire_database_up`` says 0.
"""

from __future__ import annotations

import datetime as dt
import http.server
import logging
import threading
import time
from collections.abc import Callable, Iterable

from scire_schema import metrics, protocol
from scire_schema.listener import NoiseLog, Request, Response
from scire_server import __version__
from scire_server.exceptions import ScireError
from scire_server.states import ClientStatus, State
from scire_server.store import Counts, Store
from scire_server.store.records import Caller

log = logging.getLogger(__name__)

HEALTH_PROBE_INTERVAL = 1.0  # seconds within which /healthz answers share one database probe
_TEXT = (("Content-Type", "text/plain; charset=utf-8"),)
_LISTENER_GAUGES = ("open_connections", "idle_connections", "requests_in_pool")


def fault_label(code: int | None) -> str:
    """``none`` for an answer, else the fault's name (``forbidden``, ``unavailable``...)."""
    if code is None:
        return "none"
    try:
        return protocol.FaultCode(code).name.lower()
    except ValueError:
        return str(code)


class StoreCounts:
    """The store's counts as gauges, refreshed at most once per ``refresh`` seconds."""

    def __init__(
        self,
        store: Store,
        refresh: float,
        online_within: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.refresh = refresh
        self.online_within = online_within
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: Counts | None = None
        self._fetched_at: float | None = None
        self._up = False

    def _current(self) -> tuple[Counts | None, float | None, bool]:
        now = self.clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self.refresh
        # One thread refreshes; a scrape meanwhile gets the counts it finds.
        if stale and self._lock.acquire(blocking=self._counts is None):
            try:
                try:
                    self._counts = self.store.overview.counts(self.online_within)
                    self._up = True
                except ScireError as exc:
                    self._up = False
                    log.warning("metrics: the counts could not be read: %s", exc.message)
                self._fetched_at = self.clock()
            finally:
                self._lock.release()
        return self._counts, self._fetched_at, self._up

    def collect(self) -> Iterable[metrics.Family]:
        counts, fetched_at, up = self._current()
        yield _family("scire_database_up", "1 when the last read of the counts worked", up)
        age = self.clock() - fetched_at if fetched_at is not None else 0.0
        yield _family("scire_counts_age_seconds", "age of the counts below", age)
        if counts is None:
            return
        yield metrics.Family(
            "scire_assignments",
            "gauge",
            "assignments (job x host) by state",
            tuple(
                metrics.Sample((("state", s.value),), counts.assignments.get(s.value, 0))
                for s in State
            ),
        )
        yield metrics.Family(
            "scire_clients",
            "gauge",
            "clients by enrollment status",
            tuple(
                metrics.Sample((("status", s.value),), counts.clients.get(s.value, 0))
                for s in ClientStatus
            ),
        )
        yield _family(
            "scire_clients_online",
            f"accepted clients heard from within {self.online_within} s",
            counts.clients_online,
        )
        yield metrics.Family(
            "scire_client_certificates_ending",
            "gauge",
            "accepted clients whose certificate ends within the window (days)",
            tuple(
                metrics.Sample((("within_days", str(days)),), n)
                for days, n in sorted(counts.client_certs_ending.items())
            ),
        )
        if counts.client_cert_earliest_end is not None:
            earliest = counts.client_cert_earliest_end.replace(tzinfo=dt.UTC)
            yield _family(
                "scire_client_certificate_earliest_expiry_time_seconds",
                "Unix time at which the first accepted client's certificate ends",
                earliest.timestamp(),
            )


def _family(name: str, help: str, value: float) -> metrics.Family:
    return metrics.Family(name, "gauge", help, (metrics.Sample((), float(value)),))


class ServerMetrics:
    """The daemon's registry and the counters the code moves."""

    def __init__(self, instance_key: str) -> None:
        self.registry = metrics.Registry()
        info = self.registry.gauge(
            "scire_server_info", "this daemon: version and instance key", ("version", "instance")
        )
        info.set(1, version=__version__, instance=instance_key)
        self.registry.gauge("scire_server_start_time_seconds", "Unix time of the start").set(
            time.time()
        )
        self.rpc_calls = self.registry.counter(
            "scire_rpc_calls_total",
            "XML-RPC calls by method and fault (none: answered)",
            ("method", "fault"),
        )
        self.refusals = self.registry.counter(
            "scire_refusals_total",
            "refused calls by fault and kind of caller (anonymous, client, user)",
            ("fault", "caller"),
        )
        self.certificate_ends = self.registry.gauge(
            "scire_certificate_expiry_time_seconds",
            "Unix time at which the certificate ends (ca, server)",
            ("certificate",),
        )
        self.repairs = self.registry.counter(
            "scire_recovery_actions_total",
            "what start-up recovery (phase start_up) and the sweep (phase sweep) repaired",
            ("phase", "action"),
        )
        self.rpc_duration = self.registry.histogram(
            "scire_rpc_duration_seconds",
            "time from a parsed call to its answer or fault, by method",
            ("method",),
        )
        self.polls = self.registry.counter(
            "scire_polls_total",
            "agent polls answered, with jobs (work) or none (empty)",
            ("result",),
        )
        self.jobs_sent = self.registry.counter(
            "scire_jobs_sent_total", "deliveries of a job to an agent in a poll answer"
        )
        self.jobs_acknowledged = self.registry.counter(
            "scire_jobs_acknowledged_total", "deliveries an agent acknowledged (has on disk)"
        )
        self.reports = self.registry.counter(
            "scire_reports_total",
            "status reports applied, by the state reported (running or a final state)",
            ("state",),
        )
        self.denials = self.registry.counter(
            "scire_denials_total", "assignments the ACL denied at dispatch"
        )

    def certificate(self, which: str, ends: dt.datetime) -> None:
        """When the CA's or the server's certificate ends (aware UTC)."""
        self.certificate_ends.set(ends.timestamp(), certificate=which)

    def register(self, collector: metrics.Collector) -> None:
        """Add a collector (a counter object of another module, through
        ``metrics.SnapshotCollector`` when it has a ``snapshot()``)."""
        self.registry.register(collector)

    def add_listener(self, stats: Callable[[], object]) -> None:
        """The listener's counters (``Listener.stats``) as ``scire_listener_*``."""
        self.register(metrics.SnapshotCollector("scire_listener", stats, gauges=_LISTENER_GAUGES))

    def add_pusher(self, snapshot: Callable[[], object]) -> None:
        """The pusher's counters (``PushCounters.snapshot``) as ``scire_push_*_total``."""
        self.register(metrics.SnapshotCollector("scire_push", snapshot))

    def add_poll_cache(self, snapshot: Callable[[], object]) -> None:
        """The poll cache's counts (``IdleClients.snapshot``) as ``scire_poll_cache_*``."""
        self.register(
            metrics.SnapshotCollector(
                "scire_poll_cache",
                snapshot,
                gauges=("idle_clients",),
                help={
                    "answered_from_memory": "empty polls answered without the database",
                    "went_to_database": "polls of clients not known to be idle (or cache off)",
                    "missed_signals": "idle clients the safety check found work for",
                    "idle_clients": "clients whose next empty poll needs no database",
                },
            )
        )

    def call(self, method: str, fault: int | None, caller: Caller | None, seconds: float) -> None:
        """One call answered (``fault`` None) or refused, after ``seconds``."""
        self.rpc_calls.inc(method=method, fault=fault_label(fault))
        self.rpc_duration.observe(seconds, method=method)
        if fault is not None and fault != protocol.FaultCode.UNAVAILABLE:
            self.refusals.inc(
                fault=fault_label(fault), caller=caller.kind if caller else "anonymous"
            )

    # What the agents' calls did (``api.DispatchObserver``).

    def polled(self, sent: int, denied: int) -> None:
        self.polls.inc(result="work" if sent else "empty")
        if sent:
            self.jobs_sent.inc(sent)
        if denied:
            self.denials.inc(denied)

    def acknowledged(self, count: int) -> None:
        if count:
            self.jobs_acknowledged.inc(count)

    def reported(self, state: str) -> None:
        self.reports.inc(state=state)

    def repaired(self, phase: str, counts: dict[str, int]) -> None:
        for action, count in counts.items():
            if isinstance(count, int) and count > 0:
                self.repairs.inc(count, phase=phase, action=action)


class HealthCheck:
    """Whether this daemon can do its work: not shutting down, the database answering."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        #: Whether the listener drains (set once the listener exists).
        self.draining: Callable[[], bool] = lambda: False
        self.clock = clock
        self.noise = NoiseLog(log)
        self._lock = threading.Lock()
        self._last: tuple[float, str | None] | None = None

    def problem(self) -> str | None:
        """None when healthy, else the reason in a few words."""
        if self.draining():
            return "shutting down"
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last[0] < HEALTH_PROBE_INTERVAL:
                return self._last[1]
            try:
                self.store.overview.ping()
                problem = None
            except ScireError as exc:
                problem = "database not answering"
                self.noise.log(logging.WARNING, "health", "health: %s", exc.message)
            self._last = (self.clock(), problem)
            return problem


class MonitoringApp:
    """``/healthz`` and ``/metrics`` as a listener handler (the XML-RPC app's fallback)."""

    def __init__(
        self,
        health: HealthCheck,
        server_metrics: ServerMetrics,
        identify: Callable[[str | None], Caller],
    ) -> None:
        self.health = health
        self.metrics = server_metrics
        self.identify = identify

    def __call__(self, request: Request) -> Response:
        """On the TLS port: ``/metrics`` needs a user's certificate."""
        if request.path == "/metrics" and request.method in ("GET", "HEAD"):
            try:
                caller = self.identify(request.peer_fingerprint)
            except ScireError:
                caller = None
            if caller is None or caller.kind != "user":
                return Response(
                    403,
                    _TEXT,
                    b"/metrics on this port needs a Scire user's certificate "
                    b"(scire-admin user add NAME), or scrape the metrics_listen address\n",
                )
        return self.respond(request.method, request.path)

    def respond(self, method: str, path: str) -> Response:
        """The answer to an authorized request."""
        if path not in ("/healthz", "/metrics"):
            return Response(404, _TEXT, b"not found; try /healthz or /metrics\n")
        if method not in ("GET", "HEAD"):
            return Response(405, (("Allow", "GET, HEAD"), *_TEXT), b"GET only\n")
        if path == "/healthz":
            problem = self.health.problem()
            if problem is None:
                return Response(200, _TEXT, b"ok\n")
            return Response(503, _TEXT, f"unavailable: {problem}\n".encode())
        body = self.metrics.registry.exposition()
        return Response(200, (("Content-Type", metrics.CONTENT_TYPE),), body)


class PlainHTTPEndpoint:
    """``metrics_listen``: the same answers over plain HTTP, for a local scraper."""

    def __init__(self, address: tuple[str, int], app: MonitoringApp) -> None:
        self.app = app
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "Scire"
            sys_version = ""
            timeout = 10

            def do_GET(self) -> None:
                endpoint.answer(self, "GET")

            def do_HEAD(self) -> None:
                endpoint.answer(self, "HEAD")

            def do_POST(self) -> None:
                endpoint.answer(self, "POST")

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics endpoint: " + format, *args)

        self.server = http.server.ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def answer(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        try:
            response = self.app.respond(method, handler.path.split("?", 1)[0])
        except Exception:
            log.exception("metrics endpoint: %s %s failed", method, handler.path[:80])
            response = Response(500, _TEXT, b"internal error; see the server log\n")
        handler.send_response(response.status)
        for name, value in response.headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(response.body)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(response.body)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
