"""Typed configuration of ``scire-client``: one object, read from the ``[client]``
section of an INI file, then overridden by command-line flags.

Defaults are the constants below; every value is checked once, in ``check()``,
so the rest of the agent can trust it.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scire_client import runner
from scire_client.exceptions import ConfigError
from scire_schema import inifile, logformat, protocol

SECTION = "client"
POLL_BATCH = 10  # jobs asked for per poll
ENROLL_WAIT = 0.0  # seconds to wait for an administrator to accept the request
RENEW_BEFORE = 30.0  # days before expiry the daemon renews its certificate; 0 = never
HEARTBEAT_INTERVAL = 15.0  # seconds between heartbeat polls while a job runs
REPORT_RETRY_FOR = 60.0  # seconds a run keeps retrying undeliverable reports
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
CONNECT_TIMEOUT = 10.0  # seconds per socket operation
FAILBACK_AFTER = 300.0  # seconds on a later server before the first is tried again
SPOOL_RETENTION = 7 * 24 * 3600.0  # seconds reported entries stay as dedupe tombstones
POLL_INTERVAL = 60.0  # seconds between a daemon's polls, until the server suggests another
POLL_INTERVAL_MIN = 1.0  # seconds; the bounds of poll_interval, and of what a server suggests
POLL_INTERVAL_MAX = 86400.0
POLL_JITTER = protocol.POLL_JITTER  # each wait: poll_interval times a factor in [1 - j, 1 + j]
POLL_JITTER_MAX = 0.5
MAX_PARALLEL = 1  # jobs a daemon runs at once
MAX_PARALLEL_LIMIT = 256
SHUTDOWN_GRACE = 30.0  # seconds a stopping daemon lets running jobs finish before killing them
MODES = ("once", "daemon")  # protocol.AgentMode; what ``scire-client`` does without a command

_HEX64 = re.compile(r"[0-9a-f]{64}")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SET_BY_SCIRE = frozenset({"PATH", "LANG", "HOME", "USER", "LOGNAME", "TMPDIR"})


def normalize_fingerprint(raw: str) -> str:
    """Accept ``AB:CD:...``, ``sha256:abcd...`` or plain hex; return lower-case hex."""
    text = raw.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    text = text.replace(":", "")
    if not _HEX64.fullmatch(text):
        raise ConfigError(f"ca_fingerprint {raw!r} is not a SHA-256 hex digest (64 hex digits)")
    return text


def _check_variable(name: str, key: str) -> str:
    if not _VARIABLE.fullmatch(name):
        raise ConfigError(f"{key}: {name!r} is not an environment variable name")
    # Scire's own variables say what the job is; only these defaults may be replaced.
    if name.startswith(runner.RESERVED_PREFIX) or (
        name in _SET_BY_SCIRE and name not in runner.OVERRIDABLE
    ):
        raise ConfigError(f"{key}: {name} is set by Scire for every job and cannot be changed")
    return name


def _check_server(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    # TLS only: the design has no plaintext listener, and a typo must not downgrade.
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"server {url!r} is not an https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"server {url!r}: {exc}") from exc
    return url


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def parse_address(text: str, key: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); ``ConfigError`` otherwise.
    Port 0 (with ``allow_port_zero``) lets the system choose."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit():
        raise ConfigError(f"{key} {text!r} is not HOST:PORT")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ConfigError(f"{key} {text!r}: port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if any(c.isspace() for c in host) or ("[" in host or "]" in host):
        raise ConfigError(f"{key} {text!r}: {host!r} is not a host name or address")
    if not host and key != "listen":
        raise ConfigError(f"{key} {text!r} names no host")
    return host, port


@dataclasses.dataclass
class ClientConfig:
    state_dir: Path
    name: str = dataclasses.field(default_factory=socket.gethostname)
    servers: list[str] = dataclasses.field(default_factory=list)  # ordered: failover
    ca_file: Path | None = None  # default: state_dir/ca.pem
    ca_fingerprint: str = ""  # SHA-256 of the CA's DER certificate, to check a fetched CA
    enrollment_token: str = ""
    poll_batch: int = POLL_BATCH
    enroll_wait: float = ENROLL_WAIT
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    report_retry_for: float = REPORT_RETRY_FOR
    kill_grace: float = KILL_GRACE
    connect_timeout: float = CONNECT_TIMEOUT
    failback_after: float = FAILBACK_AFTER
    spool_retention: float = SPOOL_RETENTION
    run_as: str = ""  # the user jobs run as; "" = the agent's own (another needs a root agent)
    work_root: Path | None = None  # each job's tree is work_root/<job id>; default state_dir/work
    job_environment: str = ""  # NAME=VALUE ... (shell quoting) added to every job's environment
    pass_environment: list[str] = dataclasses.field(default_factory=list)  # names copied from ours
    # Daemon mode (``scire-client daemon``).
    mode: str = "once"  # once: no command means run; daemon: no command means daemon
    poll_interval: float = POLL_INTERVAL
    poll_jitter: float = POLL_JITTER
    max_parallel: int = MAX_PARALLEL
    shutdown_grace: float = SHUTDOWN_GRACE
    listen: str = ""  # HOST:PORT of the poll_now listener; "" = none (the daemon only polls)
    advertise: str = ""  # HOST:PORT the server calls back; "" = listen's address
    pid_file: Path | None = None
    renew_before: float = (
        RENEW_BEFORE  # days: the daemon renews its certificate this close to expiry
    )
    log_format: str = "text"  # text | json (one JSON object per line)

    @classmethod
    def load(
        cls, path: Path | None = None, *, require_servers: bool = True, **overrides: Any
    ) -> ClientConfig:
        """Read ``path`` (if given), apply the non-None ``overrides``, check the result."""
        try:
            config = inifile.load(cls, path, SECTION, overrides)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        config.check(require_servers=require_servers)
        return config

    def check(self, *, require_servers: bool = True) -> None:
        self.state_dir = Path(self.state_dir).expanduser().absolute()
        if self.ca_file is None:
            self.ca_file = self.state_dir / "ca.pem"
        self.ca_file = Path(self.ca_file).expanduser().absolute()
        self.name = self.name.strip()
        if not self.name or len(self.name) > 255 or any(c.isspace() for c in self.name):
            raise ConfigError(f"name {self.name!r} must be 1-255 characters without spaces")
        self.servers = [_check_server(url) for url in self.servers]
        if require_servers and not self.servers:
            raise ConfigError("no server configured (servers in [client] or --server URL)")
        if self.ca_fingerprint:
            self.ca_fingerprint = normalize_fingerprint(self.ca_fingerprint)
        if self.poll_batch < 1:
            raise ConfigError("poll_batch must be at least 1")
        for name in ("heartbeat_interval", "connect_timeout", "failback_after"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be more than 0 seconds")
        for name in ("enroll_wait", "report_retry_for", "kill_grace", "spool_retention"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        self.run_as = self.run_as.strip()
        if self.work_root is None:
            self.work_root = self.state_dir / "work"
        self.work_root = Path(self.work_root).expanduser().absolute()
        self.job_variables()
        for name in self.pass_environment:
            _check_variable(name, "pass_environment")
        if self.log_format not in logformat.FORMATS:
            raise ConfigError(
                f"log_format {self.log_format!r} is not one of {', '.join(logformat.FORMATS)}"
            )
        self._check_daemon()

    def _check_daemon(self) -> None:
        self.mode = self.mode.strip().lower()
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not POLL_INTERVAL_MIN <= self.poll_interval <= POLL_INTERVAL_MAX:
            raise ConfigError(
                f"poll_interval must be {POLL_INTERVAL_MIN:g} to {POLL_INTERVAL_MAX:g} seconds"
            )
        if not 0 <= self.poll_jitter <= POLL_JITTER_MAX:
            raise ConfigError(f"poll_jitter must be 0 to {POLL_JITTER_MAX:g} (a fraction)")
        if not 1 <= self.max_parallel <= MAX_PARALLEL_LIMIT:
            raise ConfigError(f"max_parallel must be 1 to {MAX_PARALLEL_LIMIT}")
        if self.shutdown_grace < 0:
            raise ConfigError("shutdown_grace must not be negative")
        if self.renew_before < 0:
            raise ConfigError("renew_before must not be negative (days; 0 = never renew by itself)")
        self.listen = self.listen.strip()
        self.advertise = self.advertise.strip()
        if self.listen:
            host, _ = parse_address(self.listen, "listen", allow_port_zero=True)
            if not self.advertise and host in WILDCARD_HOSTS:
                raise ConfigError(
                    f"listen {self.listen!r} is every address of this host: set advertise "
                    "= HOST:PORT, the address the server can reach the listener at"
                )
        if self.advertise:
            if not self.listen:
                raise ConfigError("advertise needs listen: there is no listener to advertise")
            parse_address(self.advertise, "advertise")
        if self.pid_file is not None:
            self.pid_file = Path(self.pid_file).expanduser().absolute()

    def job_variables(self) -> dict[str, str]:
        """``job_environment`` as a mapping; ``ConfigError`` for a malformed one."""
        try:
            words = shlex.split(self.job_environment)
        except ValueError as exc:
            raise ConfigError(f"job_environment: {exc}") from exc
        variables = {}
        for word in words:
            name, equals, value = word.partition("=")
            if not equals:
                raise ConfigError(f"job_environment: {word!r} is not NAME=VALUE")
            variables[_check_variable(name, "job_environment")] = value
        return variables

    def extra_environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """What jobs get beyond the defaults: ``pass_environment`` from ``environ``
        (names it lacks are left out), then ``job_environment``."""
        passed = {name: environ[name] for name in self.pass_environment if name in environ}
        return passed | self.job_variables()

    # Files in state_dir; enroll.py writes them, transport.py reads them.
    @property
    def ca_path(self) -> Path:
        assert self.ca_file is not None  # set by check()
        return self.ca_file

    @property
    def key_file(self) -> Path:
        return self.state_dir / "key.pem"

    @property
    def csr_file(self) -> Path:
        return self.state_dir / "csr.pem"

    @property
    def cert_file(self) -> Path:
        return self.state_dir / "cert.pem"

    @property
    def work_path(self) -> Path:
        assert self.work_root is not None  # set by check()
        return self.work_root

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def server_state_file(self) -> Path:
        """The server in use after a failover, and since when (written by transport.py)."""
        return self.state_dir / "server.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "lock"
