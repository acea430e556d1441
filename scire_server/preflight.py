"""``scire-server check``: what an operator runs before starting a daemon, and
the state-directory test the daemon itself runs at start.

Each check is one line, ``ok`` or ``FAIL``, with what was found or what is
wrong in words and what to do. Checks only read: the database is neither
created nor upgraded, the port is bound and released at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from scire_schema import certs, protocol
from scire_schema.errors import SchemaError
from scire_server import migrations, store
from scire_server.config import ServerConfig
from scire_server.exceptions import ScireError
from scire_server.states import ServerState

EXPIRY_WARNING = 30  # days: a certificate closer than this to its end is named in the check


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':<4}  {self.name}: {self.text}"


def sqlite_path(config: ServerConfig) -> Path | None:
    """The SQLite file of ``database_url``, or None for another database."""
    url = config.database_url
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def state_dir_problem(config: ServerConfig) -> str | None:
    """What keeps the daemon from using its state directory, in one sentence, or None.

    The CA and the server's key must be readable; when the database is a
    SQLite file, its directory must take new files (the database, its WAL and
    shared-memory files). Tried by writing, since a read-only mount or a full
    disk is not visible in the mode bits.
    """
    state = config.state_dir
    if not state.exists():
        return f"state directory {state} does not exist: run 'scire-admin init --state-dir {state}' first"
    if not state.is_dir():
        return f"state directory {state} is not a directory"
    for path in (config.ca_cert_file, config.ca_key_file, config.cert_file, config.key_file):
        if not path.exists():
            return f"{path} is missing: run 'scire-admin init --state-dir {state}' first"
        if not os.access(path, os.R_OK):
            return f"{path} is not readable by this user (uid {os.geteuid()})"
    database = sqlite_path(config)
    if database is not None:
        where = database.parent
        try:
            with tempfile.NamedTemporaryFile(dir=where, prefix=".scire-write-test-"):
                pass
        except OSError as exc:
            what = "read-only" if exc.errno == errno.EROFS else "not writable"
            return (
                f"{where} is {what} ({exc.strerror}): the SQLite database {database.name} "
                "needs to write there"
            )
    return None


def _state_dir(config: ServerConfig) -> Finding:
    problem = state_dir_problem(config)
    if problem:
        return Finding("state dir", False, problem)
    return Finding("state dir", True, f"{config.state_dir}: files readable, writable where needed")


def _expiry(cert: x509.Certificate, now: dt.datetime) -> tuple[bool, str]:
    left = cert.not_valid_after_utc - now
    if left <= dt.timedelta(0):
        return False, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    days = left.days
    note = " (renew soon)" if days < EXPIRY_WARNING else ""
    return True, f"valid until {cert.not_valid_after_utc:%Y-%m-%d}, {days} days left{note}"


def _certificates(config: ServerConfig) -> Finding:
    try:
        ca_cert = certs.load_cert(config.ca_cert_file.read_bytes())
        ca_key = certs.load_key(config.ca_key_file.read_bytes())
        cert = certs.load_cert(config.cert_file.read_bytes())
        key = certs.load_key(config.key_file.read_bytes())
    except OSError as exc:
        return Finding("certificates", False, f"cannot read {exc.filename}: {exc.strerror}")
    except SchemaError as exc:
        return Finding(
            "certificates", False, f"a file in {config.state_dir} is damaged: {exc.message}"
        )
    if not certs.same_key(ca_cert.public_key(), ca_key):
        return Finding(
            "certificates", False, f"{config.ca_key_file} is not the key of {config.ca_cert_file}"
        )
    if not certs.same_key(cert.public_key(), key):
        return Finding(
            "certificates", False, f"{config.key_file} is not the key of {config.cert_file}"
        )
    public = ca_cert.public_key()
    signed = cert.issuer == ca_cert.subject and isinstance(public, ec.EllipticCurvePublicKey)
    if signed:
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            signed = False
    if not signed:
        return Finding(
            "certificates", False, f"{config.cert_file} was not signed by {config.ca_cert_file}"
        )
    now = protocol.utc_now()
    ca_ok, ca_text = _expiry(ca_cert, now)
    ok, text = _expiry(cert, now)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = ", ".join(str(n.value) for n in names)
    except x509.ExtensionNotFound:
        alt = "none"
    return Finding(
        "certificates",
        ca_ok and ok,
        f"CA {ca_text}; server certificate {text}; names {alt}",
    )


def _database(config: ServerConfig) -> Finding:
    database = sqlite_path(config)
    if database is not None and not database.exists():
        return Finding("database", True, f"no SQLite file yet; {database} is made at start")
    try:
        revision, head = migrations.current(config.database_url)
    except ScireError as exc:
        return Finding("database", False, f"{store.redacted(config.database_url)}: {exc.message}")
    if revision == head:
        return Finding("database", True, f"answers; schema at {revision} (the newest)")
    if revision is None:
        return Finding("database", True, f"answers; empty, the schema is made at start ({head})")
    try:
        known = migrations.known_revisions()
    except ScireError as exc:  # pragma: no cover - the migrations ship with the code
        return Finding("database", False, exc.message)
    if revision not in known:
        return Finding(
            "database",
            False,
            f"schema at {revision}, which this version ({head}) does not know: "
            "a newer scire-server wrote it; upgrade this one",
        )
    return Finding("database", True, f"answers; schema at {revision}, upgraded to {head} at start")


def _peers(config: ServerConfig) -> Finding:
    database = sqlite_path(config)
    if database is not None and not database.exists():
        return Finding("peers", True, "none yet")
    try:
        db = store.Store(store.make_engine(config.database_url), config.instance_key)
    except ScireError as exc:
        return Finding("peers", False, exc.message)
    try:
        rows = db.servers.listing()
    except ScireError as exc:
        return Finding("peers", False, exc.message)
    finally:
        db.close()
    fresh_after = store.utcnow() - dt.timedelta(seconds=config.instance_stale_after)
    live = [
        r for r in rows if r["state"] == ServerState.RUNNING and r["heartbeat_at"] > fresh_after
    ]
    for row in live:
        if row["instance_key"] == config.instance_key:
            return Finding(
                "peers",
                False,
                f"instance key {config.instance_key} is held by a live daemon "
                f"(pid {row['pid']} on {row['hostname']}); give this one its own instance_key",
            )
    if not live:
        return Finding("peers", True, "no other daemon running")
    names = ", ".join(f"{r['instance_key']} ({r['url']})" for r in live)
    return Finding("peers", True, f"{len(live)} running: {names}")


def _port(name: str, host: str, port: int) -> Finding:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return Finding(name, False, f"{host}: {exc.strerror}")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return Finding(name, False, f"cannot listen on {host}:{port}: {exc.strerror}")
    return Finding(name, True, f"{host}:{port} is free")


def run(config: ServerConfig, config_text: str) -> list[Finding]:
    """Every check, in the order an operator fixes things."""
    findings = [Finding("config", True, config_text), _state_dir(config)]
    steps: list[Callable[[], Finding]] = [
        lambda: _certificates(config),
        lambda: _database(config),
        lambda: _peers(config),
        lambda: _port("port", config.listen_host, config.listen_port),
    ]
    if config.metrics_address is not None:
        host, port = config.metrics_address
        steps.append(lambda: _port("metrics port", host, port))
    state_ok = findings[-1].ok
    for step in steps:
        finding = step()
        # Without a usable state directory the certificate check only repeats its words.
        if not state_ok and finding.name == "certificates":
            continue
        findings.append(finding)
    return findings
