"""Typed configuration of ``scire-server`` and ``scire-admin``.

Each program has one object, read from the ``[server]`` / ``[admin]`` section
of an INI file, then overridden by command-line flags. Defaults are the
constants below.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any, TypeVar

from scire_schema import inifile, logformat, protocol
from scire_server.exceptions import ConfigError

LISTEN_HOST = "127.0.0.1"
LISTEN_PORT = 8443
MAX_THREADS = 16
POLL_BATCH_MAX = 100
POLL_INTERVAL = 60  # seconds, suggested to agents
ACK_TIMEOUT = 60  # seconds a sent job waits for its acknowledgement
LOST_AFTER = 300  # seconds a running job may go without a poll from its agent
HEARTBEAT_INTERVAL = 5  # seconds between server heartbeats
INSTANCE_STALE_AFTER = 30  # seconds after which a silent daemon counts as dead
SWEEP_INTERVAL = 5  # seconds between lease/expiry/lost sweeps
# Seconds between the poll cache's safety checks (a missed signal costs at most
# this); 0 turns the cache off, so every poll reads the database.
POLL_CACHE_CHECK = 30
RETENTION_DAYS = 30
RETENTION_INTERVAL = 3600  # seconds between retention purges
# Days after its last host finished that retention removes a finished job, with
# its assignments and audit rows; 0 keeps jobs for ever.
JOB_RETENTION_DAYS = 0
SHUTDOWN_GRACE = 10  # seconds in-flight calls get on SIGTERM
REQUEST_TIMEOUT = 30  # seconds one whole request (headers and body) may take to arrive
HANDSHAKE_TIMEOUT = 10  # seconds a peer has to finish the TLS handshake
# Seconds a keep-alive connection may sit idle between requests: longer than
# the poll interval agents are told (60 s, each wait up to 10 % longer), so a
# daemon's next poll finds its connection open instead of paying a new TLS
# handshake (about 1.4 ms of server CPU with a client certificate, OpenSSL 3.0).
IDLE_TIMEOUT = 90
MAX_CONNECTIONS = 4000  # open connections in all; the oldest idle one is closed to make room
MAX_CONNECTIONS_PER_PEER = 256  # from one address (agents behind one NAT share an address)
MAX_QUEUED_REQUESTS = 64  # complete requests waiting for a thread; then 503 with Retry-After
DEFAULT_TIMEOUT = 3600  # seconds a job may run
DEFAULT_OUTPUT_LIMIT = 64 * 1024  # bytes of output kept per job and host
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INTERPRETER = "/bin/sh"
TOKEN_TTL = 24 * 3600  # seconds an enrollment token is valid
REFUSAL_SUMMARY_INTERVAL = 60  # seconds between summaries of anonymous refusals
LAST_SEEN_FLUSH_INTERVAL = 5  # seconds between writes of the agents' last-seen times
OFFLINE_AFTER_POLLS = 3  # poll intervals of silence before a client shows as offline
PUSH = True  # send poll_now to daemon-mode agents when work becomes due for them
PUSH_WORKERS = 8  # pushes in flight at once
PUSH_TIMEOUT = 2.0  # seconds one push may take, connect to answer
SCHEDULE_TICK = 1  # seconds between looks for schedules' due runs
SCHEDULE_MISFIRE_GRACE = 10  # seconds a slot may be late and still run under catch-up skip
DATABASE_WAIT = 300  # seconds start-up waits for the database to answer
METRICS_REFRESH = 15  # seconds the counts behind the state gauges of /metrics are kept


_Config = TypeVar("_Config", "ServerConfig", "AdminConfig")


def _load(
    cls: type[_Config], path: Path | None, section: str, overrides: dict[str, Any]
) -> _Config:
    try:
        config = inifile.load(cls, path, section, overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    config.check()
    return config


@dataclasses.dataclass
class ServerConfig:
    state_dir: Path = Path("/var/lib/scire")
    database_url: str = ""  # default: SQLite file scire.db in state_dir
    database_wait: float = DATABASE_WAIT  # seconds start-up retries an unreachable database
    listen_host: str = LISTEN_HOST
    listen_port: int = LISTEN_PORT
    public_url: str = ""  # how agents and admins reach this daemon
    alt_names: list[str] = dataclasses.field(default_factory=list)  # server certificate SANs
    instance_key: str = ""  # default: hostname:port
    max_threads: int = MAX_THREADS
    poll_batch_max: int = POLL_BATCH_MAX
    poll_interval: int = POLL_INTERVAL
    ack_timeout: int = ACK_TIMEOUT
    lost_after: int = LOST_AFTER
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    instance_stale_after: int = INSTANCE_STALE_AFTER
    sweep_interval: int = SWEEP_INTERVAL
    poll_cache_check: int = POLL_CACHE_CHECK
    retention_days: int = RETENTION_DAYS
    retention_interval: int = RETENTION_INTERVAL
    job_retention_days: int = JOB_RETENTION_DAYS  # 0: finished jobs are kept
    shutdown_grace: int = SHUTDOWN_GRACE
    request_timeout: int = REQUEST_TIMEOUT
    handshake_timeout: int = HANDSHAKE_TIMEOUT
    idle_timeout: int = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER
    max_queued_requests: int = MAX_QUEUED_REQUESTS
    default_timeout: int = DEFAULT_TIMEOUT
    default_output_limit: int = DEFAULT_OUTPUT_LIMIT
    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    default_interpreter: str = DEFAULT_INTERPRETER
    token_ttl: int = TOKEN_TTL
    refusal_summary_interval: int = REFUSAL_SUMMARY_INTERVAL
    last_seen_flush_interval: int = LAST_SEEN_FLUSH_INTERVAL
    offline_after_polls: int = OFFLINE_AFTER_POLLS
    push: bool = PUSH
    push_workers: int = PUSH_WORKERS
    push_timeout: float = PUSH_TIMEOUT
    schedule_tick: int = SCHEDULE_TICK
    schedule_misfire_grace: int = SCHEDULE_MISFIRE_GRACE
    log_level: str = "INFO"
    # "HOST:PORT" of a plain-HTTP /metrics and /healthz (no TLS, no certificate); "" = none.
    metrics_listen: str = ""
    metrics_refresh: int = METRICS_REFRESH
    log_format: str = "text"  # text | json (one JSON object per line)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> ServerConfig:
        return _load(cls, path, "server", overrides)

    def check(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.state_dir / 'scire.db'}"
        if not self.instance_key:
            self.instance_key = f"{socket.gethostname()}:{self.listen_port}"
        if not self.public_url:
            self.public_url = f"https://{self.listen_host}:{self.listen_port}/"
        if not self.alt_names:
            self.alt_names = sorted(
                {"localhost", "127.0.0.1", socket.gethostname(), self.listen_host}
            )
        for name in (
            "max_threads",
            "poll_batch_max",
            "ack_timeout",
            "lost_after",
            "heartbeat_interval",
            "sweep_interval",
            "default_timeout",
            "default_output_limit",
            "default_max_attempts",
            "retention_days",
            "retention_interval",
            "request_timeout",
            "handshake_timeout",
            "idle_timeout",
            "max_connections",
            "max_connections_per_peer",
            "refusal_summary_interval",
            "poll_interval",
            "last_seen_flush_interval",
            "offline_after_polls",
            "push_workers",
            "schedule_tick",
            "metrics_refresh",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not 0 <= self.poll_cache_check <= 86400:
            raise ConfigError(
                f"poll_cache_check must be 0 (off) to 86400 seconds, not {self.poll_cache_check}"
            )
        if not 0 <= self.database_wait <= 86400:
            raise ConfigError(
                f"database_wait must be 0 to 86400 seconds, not {self.database_wait:g}"
            )
        if self.job_retention_days < 0:
            raise ConfigError(
                f"job_retention_days must be 0 (keep jobs) or more, not {self.job_retention_days}"
            )
        if self.max_queued_requests < 0:
            raise ConfigError("max_queued_requests must not be negative")
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"listen_port {self.listen_port} is out of range")
        if self.schedule_misfire_grace < self.schedule_tick:
            raise ConfigError("schedule_misfire_grace must be at least schedule_tick")
        if self.instance_stale_after <= self.heartbeat_interval:
            raise ConfigError("instance_stale_after must be longer than heartbeat_interval")
        if self.lost_after <= self.last_seen_flush_interval:
            # A poll's time reaches the database only at the flush; the sweep
            # would otherwise call a live agent's running job lost.
            raise ConfigError("lost_after must be longer than last_seen_flush_interval")
        if not 0 < self.push_timeout <= 60:
            raise ConfigError(
                f"push_timeout must be more than 0 and at most 60 seconds, not {self.push_timeout}"
            )
        if self.log_format not in logformat.FORMATS:
            raise ConfigError(
                f"log_format {self.log_format!r} is not one of {', '.join(logformat.FORMATS)}"
            )
        _ = self.metrics_address  # parsed now, so a bad value stops the start

    def advice(self) -> list[str]:
        """Settings that work but cost the operator something: one line each,
        logged as warnings at start."""
        lines = []
        longest_wait = self.poll_interval * (1 + protocol.POLL_JITTER)
        if self.idle_timeout <= longest_wait:
            lines.append(
                f"idle_timeout {self.idle_timeout} s is not longer than the agents' poll "
                f"interval ({self.poll_interval} s, up to {longest_wait:.0f} s with jitter): "
                "daemon agents' connections close between polls and every poll pays a new "
                "TLS handshake; raise idle_timeout"
            )
        return lines

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` as (host, port), or None when it is empty."""
        if not self.metrics_listen:
            return None
        host, colon, port = self.metrics_listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"metrics_listen {self.metrics_listen!r} is not HOST:PORT (e.g. 127.0.0.1:9464)"
            )
        return host, int(port)

    # Files of the PKI, all in state_dir.
    @property
    def ca_cert_file(self) -> Path:
        return self.state_dir / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.state_dir / "ca.key"

    @property
    def cert_file(self) -> Path:
        return self.state_dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "server.key"


@dataclasses.dataclass
class AdminConfig:
    """``scire-admin``: which servers to call, in failover order, and with which user bundle."""

    server: list[str] = dataclasses.field(
        default_factory=lambda: [f"https://{LISTEN_HOST}:{LISTEN_PORT}/"]
    )
    bundle: Path | None = None  # a PEM file with the user's key, certificate and the CA
    timeout: float = 60.0

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> AdminConfig:
        return _load(cls, path, "admin", overrides)

    def check(self) -> None:
        if self.bundle is not None:
            self.bundle = Path(self.bundle).expanduser()
        if not self.server:
            raise ConfigError("server names no URL; use https://HOST:PORT/")
        for url in self.server:
            if not url.startswith("https://"):
                # xmlrpc.client would quietly talk TLS to an http:// URL anyway.
                raise ConfigError(
                    f"server {url!r}: Scire speaks only HTTPS; use https://HOST:PORT/"
                )
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, not {self.timeout}")
