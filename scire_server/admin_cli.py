"""``scire-admin``: the administrator's command line.

Everything but ``init``, ``db`` and ``completion`` goes through the server's
admin API over mutual TLS with a user bundle (key, certificate and CA in one
0600 PEM file). ``init`` and ``db`` work offline on the state directory and
the database. Exit codes come from ``scire_schema.exitcodes``; every failure
is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import os
import re
import ssl
import sys
import time
import uuid
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scire_schema import certs, failover, files, inifile, protocol, tls
from scire_schema.errors import SchemaError
from scire_schema.exitcodes import ExitCode, epilog
from scire_schema.protocol import CatchUp, ScheduleKind
from scire_schema.tls_errors import explain
from scire_server import __version__, ca
from scire_server.config import AdminConfig, ServerConfig
from scire_server.exceptions import (
    FAULT_NAMES,
    AuthenticationRequired,
    ConfigError,
    Forbidden,
    InvalidArgument,
    InvalidDocument,
    NotFound,
    ScireError,
    Unavailable,
)
from scire_server.states import FINAL_SUMMARIES, JOB_SUMMARIES

DEFAULT_BUNDLE = Path("~/.config/scire/admin.pem")
#: Read when -c is not given and the file exists, so daily use needs no flags.
DEFAULT_CONFIG = Path("~/.config/scire/admin.conf")


class CLIError(Exception):
    """A failure worth one line to the operator, and its exit code."""

    def __init__(
        self, message: str, code: ExitCode = ExitCode.ERROR, fault_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        #: The server's fault code when the server refused the call.
        self.fault_code = fault_code


class ConnectionFailure(CLIError):
    """The server could not be reached or TLS with it failed; ``main`` words it
    (``explain``) unless ``message`` already says it all (several servers)."""

    def __init__(self, cause: BaseException, url: str = "", message: str = "") -> None:
        super().__init__(message or str(cause), ExitCode.UNREACHABLE)
        self.cause = cause
        self.url = url
        self.worded = bool(message)


#: Tries of ``job submit`` when no answer comes back, and the wait before each retry.
SUBMIT_TRIES = 3
SUBMIT_BACKOFF = (1.0, 3.0)  # seconds before the second and the third try


def no_answer(exc: CLIError) -> bool:
    """Whether the call may or may not have run: the connection failed, was
    reset or timed out, or the server said try again later. Only an
    idempotent call (a submission with its request key) is sent again."""
    if isinstance(exc, ConnectionFailure):
        if isinstance(exc.cause, ssl.SSLError):
            return False  # TLS refused us: sending again changes nothing
        return isinstance(exc.cause, (ConnectionError, TimeoutError, http.client.HTTPException))
    return exc.fault_code == Unavailable.code


# --- the admin API connection -------------------------------------------------

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.S)


def write_bundle(path: Path, key_pem: bytes, cert_pem: str, ca_pem: str) -> None:
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        files.write_private(path, key_pem + cert_pem.encode() + ca_pem.encode())
    except OSError as exc:
        raise CLIError(f"cannot write the bundle {path}: {exc.strerror}") from exc


def connect(config: AdminConfig) -> ServerConnection:
    bundle = (config.bundle or DEFAULT_BUNDLE).expanduser()
    try:
        text = bundle.read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(
            f"cannot read the user bundle {bundle}: {exc.strerror} "
            "(make one with 'scire-admin user add' or 'scire-admin init')"
        ) from exc
    pem_certs = [m.group(0) for m in _PEM_BLOCK.finditer(text) if m.group(1) == "CERTIFICATE"]
    if len(pem_certs) < 2:
        raise CLIError(f"{bundle} is not a Scire user bundle (key, certificate and CA)")
    try:
        context = tls.client_context(None, bundle, bundle, ca_data=pem_certs[-1])
    except ssl.SSLError as exc:
        raise CLIError(f"{bundle}: {exc}") from exc
    return ServerConnection(config.server, context, config.timeout)


#: What a server fault means for the exit code; any other fault is ExitCode.ERROR.
FAULT_EXIT_CODES = {
    AuthenticationRequired.code: ExitCode.PERMISSION_DENIED,
    Forbidden.code: ExitCode.PERMISSION_DENIED,
    NotFound.code: ExitCode.NOT_FOUND,
    InvalidArgument.code: ExitCode.USAGE,
    InvalidDocument.code: ExitCode.USAGE,
    Unavailable.code: ExitCode.UNREACHABLE,
}

#: Calls that may reach a server twice: they change nothing, or the server
#: answers a repeat with the first outcome (``job_submit`` carries a request
#: key, see ``submit``). Only these are sent again, to the same server on a new
#: connection or to the next one, when one was sent and no answer came back:
#: any other may have been applied, and is not repeated behind the operator's back.
REPEATABLE_CALLS = frozenset(
    {
        "admin.audit",
        "admin.client_list",
        "admin.client_show",
        "admin.grant_list",
        "admin.group_list",
        "admin.job_list",
        "admin.job_show",
        "admin.job_submit",
        "admin.schedule_list",
        "admin.schedule_show",
        "admin.server_list",
        "admin.user_list",
        "admin.whoami",
    }
)
#: The longest "retry after" ``scire-admin`` waits out (once) when every server asks
#: for a pause; a longer one fails with ExitCode.UNREACHABLE and says how long.
PAUSE_WAIT_MAX = 30.0


class _NotSent(Exception):
    """The call never reached the server: any other server may have it."""


class _NoAnswer(Exception):
    """The call was sent but no answer came back: it may have been applied."""


class _Pause(Exception):
    """The server asked for a pause: it did not apply the call."""

    def __init__(self, seconds: float, cause: BaseException) -> None:
        super().__init__(protocol.retry_after_text(seconds))
        self.seconds = seconds
        self.cause = cause
        # The server's own words ("database unavailable: ...; retry after 5 s")
        # say why; a 503 from a full queue says only that it is busy.
        self.reason = (
            cause.faultString
            if isinstance(cause, xmlrpc.client.Fault)
            else f"the server is busy, {protocol.retry_after_text(seconds)}"
        )


class ServerConnection:
    """The admin API of the first of ``servers`` that answers, in order.

    A server that cannot be reached, that fails the TLS handshake or that asks
    for a pause is passed over for the next; the one that answers is used for
    the rest of the command. A call sent without an answer (a timeout, a reset)
    moves on only when it is in ``REPEATABLE_CALLS``. When every server asks
    for a pause of up to ``PAUSE_WAIT_MAX``, it is waited out once.
    """

    def __init__(
        self,
        servers: list[str],
        context: ssl.SSLContext,
        timeout: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.servers = list(servers)
        self._context = context
        self._timeout = timeout
        self._sleep = sleep
        self._current = 0
        self._links: dict[str, tuple[failover.SingleTryTransport, xmlrpc.client.ServerProxy]] = {}

    def call(self, method: str, *args: Any) -> Any:
        try:
            return self._call_round(method, args)
        except _Pause as exc:
            if exc.seconds > PAUSE_WAIT_MAX:
                raise self._busy(method, exc) from exc.cause
            delay = failover.stretch(exc.seconds)
            print(f"scire-admin: {exc.reason}; trying again in {delay:.1f} s", file=sys.stderr)
            self._sleep(delay)
        try:
            return self._call_round(method, args)
        except _Pause as exc:
            raise self._busy(method, exc) from exc.cause

    def _busy(self, method: str, pause: _Pause) -> CLIError:
        where = " and ".join(self.servers)
        return CLIError(
            f"{where}: {method} not applied: {pause.reason} (the server asks for a pause)",
            ExitCode.UNREACHABLE,
            Unavailable.code,
        )

    def _call_round(self, method: str, args: tuple[Any, ...]) -> Any:
        failures: list[tuple[str, BaseException, str]] = []
        pause: _Pause | None = None
        for step in range(len(self.servers)):
            index = (self._current + step) % len(self.servers)
            url = self.servers[index]
            try:
                answer = self._call_one(url, method, args)
            except _NotSent as exc:
                cause = exc.__cause__ or exc
                failures.append((url, cause, explain(cause, url)))
                continue
            except _Pause as exc:
                pause = exc if pause is None or exc.seconds < pause.seconds else pause
                failures.append((url, exc.cause, f"{urlsplit(url).netloc} busy, {exc}"))
                continue
            except _NoAnswer as exc:
                cause = exc.__cause__ or exc
                failures.append((url, cause, explain(cause, url)))
                if method in REPEATABLE_CALLS:
                    continue
                raise self._maybe_applied(method, url, cause, index) from cause
            if failures:
                skipped = "; ".join(why for _, _, why in failures)
                print(f"scire-admin: {skipped}; using {url}", file=sys.stderr)
                self._current = index
            return answer
        if pause is not None:
            raise pause
        if len(failures) == 1:
            url, cause, _ = failures[0]
            raise ConnectionFailure(cause, url) from cause
        tried = "; ".join(f"{url}: {why}" for url, _, why in failures)
        raise ConnectionFailure(
            failures[-1][1], failures[-1][0], f"no server answered {method} (tried {tried})"
        ) from failures[-1][1]

    def _maybe_applied(
        self, method: str, url: str, cause: BaseException, index: int
    ) -> ConnectionFailure:
        rest = [u for u in self.servers[index + 1 :] + self.servers[:index] if u != url]
        if not rest:
            return ConnectionFailure(cause, url)
        return ConnectionFailure(
            cause,
            url,
            f"{explain(cause, url)}; {method} may have been applied there, so it was not "
            f"sent to {', '.join(rest)}: check, then run the command again",
        )

    def _call_one(self, url: str, method: str, args: tuple[Any, ...]) -> Any:
        transport, proxy = self._link(url)
        reused = transport.connected
        try:
            transport.open(urlsplit(url).netloc)
        except (OSError, http.client.HTTPException) as exc:
            raise _NotSent() from exc
        try:
            try:
                return getattr(proxy, method)(*args)
            except (OSError, http.client.HTTPException) as exc:
                if not (reused and method in REPEATABLE_CALLS and failover.stale_connection(exc)):
                    raise
            # The server closed the kept-alive connection since the last call
            # (``job wait`` calls job_show many times): once more, on a new one.
            transport.open(urlsplit(url).netloc)
            return getattr(proxy, method)(*args)
        except xmlrpc.client.Fault as exc:
            seconds = failover.retry_after(exc)
            if seconds is not None:
                raise _Pause(seconds, exc) from exc
            name = FAULT_NAMES.get(exc.faultCode, "Fault")
            raise CLIError(
                f"{exc.faultString} ({name}, fault {exc.faultCode})",
                FAULT_EXIT_CODES.get(exc.faultCode, ExitCode.ERROR),
                exc.faultCode,
            ) from exc
        except xmlrpc.client.ProtocolError as exc:
            seconds = failover.retry_after(exc)
            if seconds is not None:
                raise _Pause(seconds, exc) from exc
            raise CLIError(
                f"{exc.url} answered HTTP {exc.errcode} {exc.errmsg}: is --server a Scire server?",
                ExitCode.UNREACHABLE,
            ) from exc
        except ssl.SSLError as exc:
            raise _NotSent() from exc  # TLS refused before the request went out
        except (OSError, http.client.HTTPException) as exc:
            raise _NoAnswer() from exc

    def _link(self, url: str) -> tuple[failover.SingleTryTransport, xmlrpc.client.ServerProxy]:
        link = self._links.get(url)
        if link is None:
            transport = failover.SingleTryTransport(self._context, self._timeout)
            link = (transport, xmlrpc.client.ServerProxy(url, transport=transport, allow_none=True))
            self._links[url] = link
        return link

    def close(self) -> None:
        for transport, _ in self._links.values():
            transport.close()
        self._links.clear()


def call(connection: ServerConnection, method: str, *args: Any) -> Any:
    return connection.call(method, *args)


# --- output -----------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    text = str(value)
    if re.match(r"^\d{4}-\d\d-\d\dT", text):
        return text[:19].replace("T", " ")
    return text


def show(args: argparse.Namespace, value: Any, columns: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps(value, indent=2, sort_keys=True))
    elif columns is not None:
        print(table(value, columns))
    elif isinstance(value, dict):
        for key, item in value.items():
            print(f"{key}: {_cell(item)}")
    else:
        print(value)


# --- offline commands ----------------------------------------------------------------


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig.load(
        args.server_config,
        state_dir=args.state_dir,
        database_url=args.database_url,
        alt_names=args.alt_name or None,
        listen_port=getattr(args, "listen_port", None),
    )


def cmd_init(args: argparse.Namespace) -> ExitCode:
    # The database layer and the CA only here and in the other offline commands:
    # the commands that talk to the server start without them.
    from scire_server import migrations, store

    config = server_config(args)
    bundle = args.bundle.expanduser()
    if config.ca_key_file.exists():
        raise CLIError(f"{config.state_dir} holds a CA already; init does not overwrite it")
    reserve_bundle(bundle)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config.state_dir, 0o700)
    except OSError as exc:
        bundle.unlink()
        raise CLIError(
            f"cannot make the state directory {config.state_dir}: {exc.strerror}"
        ) from exc
    database = store.redacted(config.database_url)
    try:
        # The database first: an unreachable one costs nothing written, so
        # init runs again as it is once the URL or the server is fixed.
        migrations.upgrade(config.database_url)
    except ConfigError:  # a bad URL or a missing driver: its own line
        bundle.unlink(missing_ok=True)
        raise
    except ScireError as exc:
        bundle.unlink(missing_ok=True)
        raise CLIError(
            f"cannot set up the database {database}: {exc.message}; nothing was written, "
            "fix that and run init again"
        ) from None
    try:
        ca_key, ca_cert = ca.create_ca()
        files.write_private(config.ca_key_file, certs.key_to_pem(ca_key))
        files.write_public(config.ca_cert_file, certs.cert_to_pem(ca_cert))
        server_key = certs.generate_key()
        server_cert = ca.issue_certificate(
            ca_key,
            ca_cert,
            server_key.public_key(),
            config.alt_names[0],
            ca.ROLE_SERVER,
            config.alt_names,
        )
        files.write_private(config.key_file, certs.key_to_pem(server_key))
        files.write_public(config.cert_file, certs.cert_to_pem(server_cert))
        user_key = certs.generate_key()
        user_cert = ca.sign_csr(
            ca_key, ca_cert, certs.make_csr(user_key, args.admin), args.admin, ca.ROLE_USER
        )
        db = store.Store(store.make_engine(config.database_url), "scire-admin init")
        try:
            db.directory.add_user(
                args.admin, certs.fingerprint(user_cert), True, "scire-admin init"
            )
        finally:
            db.close()
    except (OSError, ScireError) as exc:
        bundle.unlink(missing_ok=True)
        raise CLIError(
            f"init stopped half-way: {_why(exc)}; fix that (disk full? read-only?), "
            f"remove {config.state_dir} and run init again"
        ) from None
    ca_pem = certs.cert_to_pem(ca_cert).decode()
    write_bundle(bundle, certs.key_to_pem(user_key), certs.cert_to_pem(user_cert).decode(), ca_pem)
    answer = {
        "state_dir": str(config.state_dir),
        "database": database,
        "server_names": config.alt_names,
        "admin": args.admin,
        "bundle": str(bundle),
        "ca_fingerprint": certs.fingerprint(ca_cert),
    }
    if bundle == DEFAULT_BUNDLE.expanduser():
        answer["admin_config"] = write_admin_config(config.public_url, bundle)
    show(args, answer)
    return ExitCode.OK


def _why(exc: BaseException) -> str:
    """One line for a disk or database failure, without SQLAlchemy's SQL and links."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    if isinstance(exc, ScireError):
        return exc.message
    return str(exc)


def write_admin_config(server: str, bundle: Path) -> str:
    """Write the default admin.conf for the bundle ``init`` made, unless one exists."""
    path = DEFAULT_CONFIG.expanduser()
    if path.exists():
        return f"{path} (kept as it was)"
    text = f"[admin]\nserver = {server}\nbundle = {bundle}\n"
    try:
        files.write_atomic(path, text.encode(), 0o600)
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror}") from exc
    return str(path)


def check_bundle_target(path: Path) -> None:
    if path.exists():
        raise CLIError(f"{path} exists already; choose another path (--bundle or --out)")


def cmd_db(args: argparse.Namespace) -> ExitCode:
    from scire_server import migrations, store

    config = server_config(args)
    database = store.redacted(config.database_url)
    try:
        if args.db_command == "upgrade":
            before, head = migrations.current(config.database_url)
            migrations.upgrade(config.database_url)
            answer = {"database": database, "from": before or "empty", "to": head}
        else:
            current, head = migrations.current(config.database_url)
            answer = {"database": database, "current": current or "empty", "head": head}
    except ConfigError:
        raise
    except (OSError, ScireError) as exc:
        raise CLIError(f"{database}: {_why(exc)}") from None
    show(args, answer)
    return ExitCode.OK


def cmd_server_cert(args: argparse.Namespace) -> ExitCode:
    """Reissue the server's certificate from the CA: the names it has, plus
    ``--alt-name`` ones, valid from now. The server reads it when it starts."""
    config = server_config(args)
    try:
        ca_key = certs.load_key(config.ca_key_file.read_bytes())
        ca_cert = certs.load_cert(config.ca_cert_file.read_bytes())
        old = certs.load_cert(config.cert_file.read_bytes())
    except OSError as exc:
        raise CLIError(
            f"{config.state_dir}: {_why(exc)}; run this on the server host as the user that "
            "owns its state directory"
        ) from exc
    except SchemaError as exc:
        raise CLIError(f"{config.state_dir}: {exc}") from exc
    names = certs.subject_alt_names(old)
    names += [name for name in args.alt_name or [] if name not in names]
    key = certs.generate_key()
    cert = ca.issue_certificate(
        ca_key, ca_cert, key.public_key(), names[0], ca.ROLE_SERVER, names, days=args.days
    )
    try:
        # The key first: a server started in between reads the old pair or fails
        # on a mismatch, never serves a certificate for the wrong key.
        files.write_private(config.key_file, certs.key_to_pem(key))
        files.write_public(config.cert_file, certs.cert_to_pem(cert))
    except OSError as exc:
        raise CLIError(f"{config.cert_file}: {_why(exc)}") from exc
    show(
        args,
        {
            "certificate": str(config.cert_file),
            "names": names,
            "added": [name for name in names if name not in certs.subject_alt_names(old)],
            "expires": protocol.format_time(cert.not_valid_after_utc),
            "next": "restart scire-server to serve it",
        },
    )
    return ExitCode.OK


def cmd_completion(args: argparse.Namespace) -> ExitCode:
    # shtab writes the script from the parser itself, so completion never
    # falls behind a new command or flag.
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return ExitCode.OK


# --- online commands -----------------------------------------------------------------


def cmd_client(args: argparse.Namespace, proxy: Any) -> ExitCode:
    sub = args.client_command
    if sub == "list":
        # Without a filter the call has no arguments, so an older server answers it too.
        filters = (args.group or "", args.offline) if args.group or args.offline else ()
        clients = call(proxy, "admin.client_list", *filters)
        if args.json:
            show(args, clients)
            return ExitCode.OK
        show(
            args,
            [client_presence(c) for c in clients],
            [
                "name",
                "status",
                "active_jobs",
                "last_seen_at",
                "registered_at",
                "presence",
                "mode",
                "version",
                "cert_expires",
                "key_fingerprint",
            ],
        )
    elif sub == "show":
        detail = call(proxy, "admin.client_show", args.name)
        if args.json:
            show(args, detail)
            return ExitCode.OK
        recent = detail.pop("recent_jobs")
        show(args, client_presence(detail))
        print("\nrecent jobs:")
        print(table(recent, ["job_id", "name", "state", "updated_at"]))
    elif sub == "token":
        show(args, call(proxy, "admin.client_token", args.uses, args.ttl or 0))
    elif sub == "accept":
        show(args, call(proxy, "admin.client_accept", args.name, args.fingerprint or ""))
    else:
        show(args, call(proxy, f"admin.client_{sub}", args.name))
    return ExitCode.OK


def client_presence(client: dict[str, Any]) -> dict[str, Any]:
    """A client as the tables show it: ``presence`` in a word (online, offline,
    or "-" for a client that is not accepted), ``mode`` and ``version``."""
    word = "-"
    if client.get("status") == "accepted":
        word = "online" if client.get("online") else "offline"
    return client | {
        "presence": word,
        "mode": client.get("agent_mode"),
        "version": client.get("agent_version"),
        "cert_expires": cert_expiry(
            client.get("cert_not_after"), protocol.utc_now().replace(tzinfo=None)
        ),
    }


#: A client certificate this close to its end is flagged in the tables.
CERT_EXPIRY_WARNING = dt.timedelta(days=30)


def cert_expiry(not_after: str | None, now: dt.datetime) -> str | None:
    """A certificate's end as the tables show it: the day, flagged when it is
    less than ``CERT_EXPIRY_WARNING`` away or past; None without a certificate
    (or from a server that does not say)."""
    if not not_after:
        return None
    end = protocol.parse_time(not_after)
    day = f"{end:%Y-%m-%d}"
    if end <= now:
        return f"{day} (EXPIRED)"
    if end - now < CERT_EXPIRY_WARNING:
        return f"{day} (expires in < {CERT_EXPIRY_WARNING.days} days)"
    return day


def cmd_group(args: argparse.Namespace, proxy: Any) -> ExitCode:
    kind = "user" if args.user else "client"
    sub = args.group_command
    if sub == "list":
        show(args, call(proxy, "admin.group_list", kind), ["name", "members"])
    elif sub in ("create", "delete"):
        show(args, call(proxy, f"admin.group_{sub}", kind, args.name))
    else:
        answers = [
            call(proxy, f"admin.group_{sub}", kind, args.name, member) for member in args.members
        ]
        if args.json:
            # One JSON document, however many members: one object for one, else a list.
            show(args, answers[0] if len(answers) == 1 else answers)
        else:
            for answer in answers:
                show(args, answer)
    return ExitCode.OK


def cmd_user(args: argparse.Namespace, proxy: Any) -> ExitCode:
    sub = args.user_command
    if sub == "list":
        show(
            args,
            call(proxy, "admin.user_list"),
            ["name", "is_admin", "status", "groups", "created_at"],
        )
    elif sub == "revoke":
        show(args, call(proxy, "admin.user_revoke", args.name))
    else:
        out = (args.out or Path(f"{args.name}.pem")).expanduser()
        reserve_bundle(out)
        key = certs.generate_key()
        try:
            answer = call(
                proxy,
                "admin.user_add",
                args.name,
                certs.make_csr(key, args.name).decode(),
                args.admin,
            )
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        write_bundle(out, certs.key_to_pem(key), answer["certificate"], answer["ca"])
        show(args, {"name": args.name, "admin": args.admin, "bundle": str(out)})
    return ExitCode.OK


def reserve_bundle(path: Path) -> None:
    """Make an empty 0600 file where the bundle goes, before anything else is made.

    Asking ``os.access`` is not enough (root may "write" to /proc, a read-only
    mount says yes to it), so this really creates the file; ``write_bundle``
    then replaces it. Refuses a path that exists.
    """
    check_bundle_target(path)
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise CLIError(f"cannot write the bundle {path}: {exc.strerror}") from exc


def cmd_grant(args: argparse.Namespace, proxy: Any) -> ExitCode:
    sub = args.grant_command
    if sub == "list":
        show(
            args,
            call(proxy, "admin.grant_list"),
            ["id", "subject", "privilege", "target", "created_by"],
        )
    elif sub == "add":
        show(args, call(proxy, "admin.grant_add", args.subject, args.privilege, args.target))
    else:
        show(args, call(proxy, "admin.grant_remove", args.id))
    return ExitCode.OK


def _read_script(args: argparse.Namespace) -> str:
    # Read as bytes: text mode would turn \r\n into \n, and the script must arrive byte-exact.
    if args.command:
        return str(args.command)
    where = "standard input" if str(args.script) == "-" else str(args.script)
    try:
        if str(args.script) == "-":
            data = sys.stdin.buffer.read()
        else:
            data = Path(args.script).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read the script {where}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(
            f"the script {where} is not UTF-8 text (at byte {exc.start}): Scire sends "
            "scripts as text; for a binary, ship it another way and submit a script that runs it",
            ExitCode.USAGE,
        ) from exc
    if "\x00" in text:
        raise CLIError(
            f"the script {where} holds NUL bytes: it looks binary; Scire sends scripts as text",
            ExitCode.USAGE,
        )
    return text


def job_list(args: argparse.Namespace, proxy: Any) -> ExitCode:
    """One page of jobs, or with ``--all`` every page, oldest first."""
    columns = ["id", "name", "owner", "priority", "state", "states", "created_at"]
    before = args.before or 0
    if not args.all:
        jobs = call(proxy, "admin.job_list", args.limit, args.state or "", before)
        show(args, jobs, columns)
        if len(jobs) == args.limit and not args.json:
            print(
                f"(more: scire-admin job list --before {jobs[0]['id']}"
                f"{' --state ' + args.state if args.state else ''})",
                file=sys.stderr,
            )
        return ExitCode.OK
    pages: list[list[dict[str, Any]]] = []
    while True:
        jobs = call(proxy, "admin.job_list", 1000, args.state or "", before)
        if not jobs:
            break
        pages.append(jobs)
        before = jobs[0]["id"]
        if len(jobs) < 1000:
            break
    show(args, [job for page in reversed(pages) for job in page], columns)
    return ExitCode.OK


def cmd_job(args: argparse.Namespace, proxy: Any) -> ExitCode:
    sub = args.job_command
    if sub == "submit":
        return job_submit(args, proxy)
    if sub == "submit-many":
        return job_submit_many(args, proxy)
    if sub == "list":
        return job_list(args, proxy)
    elif sub == "show":
        show_job(args, call(proxy, "admin.job_show", args.id))
    elif sub == "cancel":
        show(args, call(proxy, "admin.job_cancel", args.id))
    elif sub == "retry":
        return job_retry(args, proxy)
    elif sub == "wait":
        deadline = time.monotonic() + args.timeout
        while True:
            detail = call(proxy, "admin.job_show", args.id)
            if detail["state"] in FINAL_SUMMARIES or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        show_job(args, detail)
        return job_exit_code(detail, args.timeout)
    elif sub == "output":
        return job_output(args, proxy)
    elif sub == "watch":
        from scire_server import job_watch  # rich, only for the live view

        return job_watch.watch(
            args.id,
            lambda: call(proxy, "admin.job_show", args.id),
            as_json=args.json,
            timeout=args.timeout,
            is_final=lambda detail: detail["state"] in FINAL_SUMMARIES,
            exit_code=job_exit_code,
        )
    return ExitCode.OK


def job_retry(args: argparse.Namespace, proxy: Any) -> ExitCode:
    """``job retry``: the failed and timed-out hosts of a finished job run it again."""
    answer = call(proxy, "admin.job_retry", args.id, args.host or [])
    if args.json:
        show(args, answer)
    else:
        print(
            f"job {answer['job_id']} retried on {', '.join(answer['retried'])} "
            "(previous attempt kept in: scire-admin audit --job "
            f"{answer['job_id']})"
        )
    for why in answer["refused"]:
        print(f"refused: {why}", file=sys.stderr if args.json else sys.stdout)
    return ExitCode.TARGETS_REFUSED if answer["refused"] else ExitCode.OK


#: Seconds between two asks of ``job output --follow``.
FOLLOW_INTERVAL = 1.0


def job_output(args: argparse.Namespace, proxy: Any) -> ExitCode:
    """One host's output of a job; with ``--follow`` the new text as it comes,
    until the host's assignment is final. Exits like ``job wait`` for that host."""
    deadline = time.monotonic() + args.timeout if args.timeout else None
    offset = 0
    attempt: int | None = None
    printed = ""  # the last text printed: the output ends with a newline either way
    while True:
        part = call(proxy, "admin.job_output", args.id, args.host, offset)
        if attempt is not None and (part["attempt"] != attempt or part["start"] < offset):
            if not args.json:
                print(
                    f"\n--- attempt {part['attempt']}: output from the start ---", file=sys.stderr
                )
        attempt = part["attempt"]
        if part["text"]:
            if args.json:
                show_line(part)
            else:
                sys.stdout.write(part["text"])
                sys.stdout.flush()
            printed = part["text"]
        offset = part["length"]
        if part["final"] or not args.follow:
            break
        if deadline is not None and time.monotonic() > deadline:
            print(
                f"scire-admin: job {args.id} on {args.host} still {part['state']} "
                f"after {args.timeout:g} s",
                file=sys.stderr,
            )
            return ExitCode.NOT_FINISHED
        time.sleep(FOLLOW_INTERVAL)
    if args.json:
        if not part["text"]:
            show_line(part)
    elif printed and not printed.endswith("\n"):
        print()
    if part["truncated"] and not args.json:
        print(
            f"scire-admin: the output of {args.host} was cut at the job's output limit",
            file=sys.stderr,
        )
    if not part["final"]:
        return ExitCode.NOT_FINISHED if args.follow else ExitCode.OK
    if part["state"] != "succeeded":
        why = f": {part['reason']}" if part["reason"] else ""
        print(f"scire-admin: job {args.id} on {args.host}: {part['state']}{why}", file=sys.stderr)
        return ExitCode.HOSTS_FAILED
    return ExitCode.OK


def show_line(value: dict[str, Any]) -> None:
    """One JSON object on one line (a stream a script reads line by line)."""
    print(json.dumps(value, default=str), flush=True)


def cmd_cert(args: argparse.Namespace, proxy: Any) -> ExitCode:
    """Renew the caller's own certificate: a new key and request, signed by the
    server over this connection; the bundle is replaced in one atomic write."""
    bundle = (admin_config(args).bundle or DEFAULT_BUNDLE).expanduser()
    whoami = call(proxy, "admin.whoami")
    key = certs.generate_key()
    answer = call(proxy, "admin.renew_certificate", certs.make_csr(key, whoami["name"]).decode())
    cert = certs.load_cert(answer["certificate"])
    if not certs.same_key(cert.public_key(), key) or certs.common_name(cert) != whoami["name"]:
        raise CLIError("the server answered a certificate for another key or name; bundle kept")
    write_bundle(bundle, certs.key_to_pem(key), answer["certificate"], answer["ca"])
    show(
        args,
        {
            "name": answer["name"],
            "bundle": str(bundle),
            "fingerprint": answer["fingerprint"],
            "expires": answer["expires"],
        },
    )
    return ExitCode.OK


def schedule_keys(args: argparse.Namespace) -> dict[str, Any]:
    """The schedule keys of a submission (``at``/``every``/``cron`` and their
    options), checked here so a typo fails before any call; empty for a job."""
    kinds = [k for k in ScheduleKind if getattr(args, k.value) is not None]
    if not kinds:
        for flag, value in (
            ("--timezone", args.timezone),
            ("--catch-up", args.catch_up),
            ("--allow-overlap", args.allow_overlap or None),
        ):
            if value is not None:
                raise CLIError(
                    f"{flag} is for schedules: add --at, --every or --cron", ExitCode.USAGE
                )
        return {}
    (kind,) = kinds  # argparse keeps them exclusive
    if args.not_before or args.expires:
        raise CLIError(
            "--not-before and --expires are for a single job; a schedule's runs have neither",
            ExitCode.USAGE,
        )
    from scire_server import recurrence  # APScheduler's triggers: only for a schedule

    timezone = args.timezone or recurrence.DEFAULT_TIMEZONE
    value = getattr(args, kind.value)
    try:
        recurrence.Recurrence.from_request(kind, value, timezone, dt.datetime.now(dt.UTC))
    except recurrence.RecurrenceError as exc:
        raise CLIError(f"--{kind.value}: {exc}", ExitCode.USAGE) from exc
    return {
        kind.value: value,
        "timezone": timezone,
        "catch_up": args.catch_up or CatchUp.ONCE.value,
        "allow_overlap": args.allow_overlap,
    }


def job_submit(args: argparse.Namespace, proxy: Any) -> ExitCode:
    schedule = schedule_keys(args)
    spec = {
        "name": args.name
        or (Path(args.script).name if args.script and str(args.script) != "-" else "command"),
        # Binary: an XML-RPC string would turn \r into \n and cannot carry ESC.
        "script": xmlrpc.client.Binary(_read_script(args).encode("utf-8")),
        "hosts": args.host or [],
        "groups": args.group or [],
        "priority": args.priority,
        "timeout": args.timeout,
        "privilege": args.privilege,
        "interpreter": args.interpreter,
        "not_before": args.not_before,
        "expires": args.expires,
        "max_attempts": args.max_attempts,
        "output_limit": args.output_limit,
        "rerun_on_agent_crash": args.rerun_on_agent_crash,
        # One key per invocation, sent again on every retry: a lost answer
        # never turns into a second job.
        "request_key": args.request_key or str(uuid.uuid4()),
        **schedule,
    }
    answer = submit(proxy, {k: v for k, v in spec.items() if v is not None})
    if "schedule_id" in answer:
        if args.json:
            show(args, answer)
        else:
            again = " (submitted before with this request key)" if answer.get("repeated") else ""
            targets = f" for {', '.join(answer['accepted'])}" if answer["accepted"] else ""
            print(
                f"schedule {answer['schedule_id']} ({answer.get('when', '')}) created{targets}"
                f"{again}; next run {_cell(answer['next_due_at'])} UTC"
            )
    elif args.json:
        show(args, answer)
    else:
        again = " (submitted before with this request key)" if answer.get("repeated") else ""
        print(f"job {answer['job_id']} submitted for {', '.join(answer['accepted'])}{again}")
    for why in answer["refused"]:
        print(f"refused: {why}", file=sys.stderr if args.json else sys.stdout)
    return ExitCode.TARGETS_REFUSED if answer["refused"] else ExitCode.OK


#: The keys a line of ``job submit-many`` may have ("command" is the script's text).
BULK_KEYS = frozenset(
    "command script hosts groups name priority timeout privilege interpreter not_before "
    "expires max_attempts output_limit rerun_on_agent_crash request_key".split()
)


def read_job_lines(text: bytes) -> list[tuple[int, dict[str, Any]]]:
    """The job specs of a ``submit-many`` file, each checked, with its line
    number; a ``CLIError`` (usage) naming the first bad line, before any is sent."""
    digest = hashlib.sha256(text).hexdigest()[:24]
    specs = []
    for number, line in enumerate(text.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"line {number}: not JSON: {exc.msg}", ExitCode.USAGE) from None
        if not isinstance(item, dict):
            raise CLIError(f"line {number}: not a JSON object", ExitCode.USAGE)
        unknown = sorted(set(item) - BULK_KEYS)
        if unknown:
            raise CLIError(
                f"line {number}: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(BULK_KEYS))}",
                ExitCode.USAGE,
            )
        if ("command" in item) == ("script" in item):
            raise CLIError(
                f'line {number}: give "command" or "script", one of them', ExitCode.USAGE
            )
        script = item.pop("command", None) or item.pop("script", None)
        if not isinstance(script, str) or not script.strip():
            raise CLIError(f"line {number}: the script must be non-empty text", ExitCode.USAGE)
        for key in ("hosts", "groups"):
            targets = item.get(key, [])
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise CLIError(f'line {number}: "{key}" must be a list of names', ExitCode.USAGE)
        item["groups"] = [g.removeprefix("@") for g in item.get("groups", [])]
        if not item.get("hosts") and not item["groups"]:
            raise CLIError(f"line {number}: no hosts or groups", ExitCode.USAGE)
        item["script"] = xmlrpc.client.Binary(script.encode("utf-8"))
        item.setdefault("request_key", f"bulk-{digest}-{number}")
        specs.append((number, item))
    if not specs:
        raise CLIError("no job in the file", ExitCode.USAGE)
    return specs


def job_submit_many(args: argparse.Namespace, proxy: Any) -> ExitCode:
    path = str(args.file)
    try:
        text = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}", ExitCode.USAGE) from None
    worst = ExitCode.OK
    for number, spec in read_job_lines(text):
        try:
            answer = submit(proxy, spec)
        except ConnectionFailure:
            raise  # no server: the lines after this one were not sent either
        except CLIError as exc:
            print(f"scire-admin: line {number}: {exc}", file=sys.stderr)
            worst = ExitCode.ERROR
            continue
        if args.json:
            show_line({"line": number} | answer)
        else:
            again = " (submitted before with this request key)" if answer.get("repeated") else ""
            accepted = ", ".join(answer["accepted"]) or "no host"
            print(f"line {number}: job {answer['job_id']} submitted for {accepted}{again}")
            for why in answer["refused"]:
                print(f"line {number}: refused: {why}")
        if answer["refused"] and worst == ExitCode.OK:
            worst = ExitCode.TARGETS_REFUSED
    return worst


def submit(proxy: Any, spec: dict[str, Any]) -> Any:
    """``admin.job_submit``, tried again with the same request key when no
    answer came back: the server answers a repeated key with the first job."""
    for wait in SUBMIT_BACKOFF[: SUBMIT_TRIES - 1]:
        try:
            return call(proxy, "admin.job_submit", spec)
        except CLIError as exc:
            if not no_answer(exc):
                raise
            print(
                f"scire-admin: no answer ({exc}); trying again in {wait:g} s "
                f"with the same request key {spec['request_key']}",
                file=sys.stderr,
            )
            time.sleep(wait)
    return call(proxy, "admin.job_submit", spec)


def job_exit_code(detail: dict[str, Any], waited: float | None) -> ExitCode:
    """What ``job wait`` and ``job watch`` return for a job as it now stands."""
    if detail["state"] not in FINAL_SUMMARIES:
        after = f" after {waited:g} s" if waited is not None else ""
        print(f"scire-admin: job {detail['id']} still {detail['state']}{after}", file=sys.stderr)
        return ExitCode.NOT_FINISHED
    failed = [a["client"] for a in detail["assignments"] if a["state"] != "succeeded"]
    if failed:
        print(
            f"scire-admin: job {detail['id']}: {len(failed)} of {len(detail['assignments'])} "
            f"host(s) did not succeed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return ExitCode.HOSTS_FAILED
    return ExitCode.OK


def show_job(args: argparse.Namespace, detail: dict[str, Any]) -> None:
    if args.json:
        show(args, detail)
        return
    print(f"job {detail['id']} ({detail['name']}) by {detail['owner']}: {detail['state']}")
    print(
        f"  priority {detail['priority']}, timeout {detail['timeout']} s, "
        f"privilege {detail['privilege']}, created {_cell(detail['created_at'])}"
    )
    if detail.get("schedule_id"):
        print(
            f"  run of schedule {detail['schedule_id']} ({detail['schedule']}) "
            f"due at {_cell(detail['due_at'])} UTC"
        )
    print(
        table(
            detail["assignments"],
            ["client", "state", "attempt", "exit_code", "started_at", "finished_at", "reason"],
        )
    )
    for why in detail.get("skipped", []):
        print(f"skipped: {why}")
    for why in detail.get("refused", []):
        print(f"refused: {why}")
    for a in detail["assignments"]:
        if a.get("output") is not None:
            flag = " (truncated)" if a["output_truncated"] else ""
            print(f"--- output of {a['client']}{flag} ---")
            print(a["output"].rstrip("\n"))


def cmd_schedule(args: argparse.Namespace, proxy: Any) -> ExitCode:
    sub = args.schedule_command
    if sub == "list":
        show(
            args,
            call(proxy, "admin.schedule_list", args.all),
            ["id", "name", "owner", "when", "state", "catch_up", "runs", "next_due_at"],
        )
    elif sub == "show":
        show_schedule(args, call(proxy, "admin.schedule_show", args.id))
    else:
        answer = call(proxy, f"admin.schedule_{sub}", args.id)
        if args.json:
            show(args, answer)
        else:
            upcoming = (
                f"; next run {_cell(answer['next_due_at'])} UTC"
                if answer.get("next_due_at") and answer["state"] == "active"
                else ""
            )
            print(f"schedule {answer['id']} {answer['state']}{upcoming}")
    return ExitCode.OK


def show_schedule(args: argparse.Namespace, detail: dict[str, Any]) -> None:
    if args.json:
        show(args, detail)
        return
    overlap = ", overlap allowed" if detail["allow_overlap"] else ""
    print(
        f"schedule {detail['id']} ({detail['name']}) by {detail['owner']}: {detail['state']}, "
        f"{detail['when']}, catch-up {detail['catch_up']}{overlap}"
    )
    targets = [*detail["hosts"], *(f"@{g}" for g in detail["groups"])]
    print(f"  targets {', '.join(targets)}; privilege {detail['job'].get('privilege')}")
    upcoming = _cell(detail["next_due_at"]) + " UTC" if detail["next_due_at"] else "none"
    print(f"  next run {upcoming}; {detail['run_count']} run(s) so far, the newest:")
    print(table(detail["runs"], ["job_id", "due_at", "created_at", "state", "states"]))
    for run in detail["runs"]:
        for why in run["skipped"]:
            print(f"  run {run['job_id']} skipped {why}")


def cmd_audit(args: argparse.Namespace, proxy: Any) -> ExitCode:
    events = call(proxy, "admin.audit", args.job or 0, args.client or "", args.limit)
    if not args.json:
        events = [e | {"detail": one_line(e.get("detail"))} for e in events]
    show(
        args,
        events,
        ["at", "actor", "action", "job_id", "client", "old_state", "new_state", "detail"],
    )
    return ExitCode.OK


def one_line(detail: str | None) -> str | None:
    """An audit detail in a table row: its first line, saying how many more
    there are (a ``retry`` row holds the previous attempt's output)."""
    if detail is None or "\n" not in detail.rstrip("\n"):
        return detail.rstrip("\n") if detail else detail
    first, *more = detail.rstrip("\n").split("\n")
    return f"{first} (+{len(more)} lines: --json shows them)"


def cmd_server(args: argparse.Namespace, proxy: Any) -> ExitCode:
    show(
        args,
        call(proxy, "admin.server_list"),
        ["instance_key", "hostname", "pid", "state", "heartbeat_at", "heartbeat_age", "url"],
    )
    return ExitCode.OK


# --- argument types: refuse bad values before calling the server ---------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not -1000 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from -1000 to 1000, not {value}")
    return value


def _parse_time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time, e.g. 2030-01-31T18:00 or 2030-01-31T18:00+01:00"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def iso_time(text: str) -> str:
    _parse_time(text)
    return text


def future_time(text: str) -> str:
    if _parse_time(text) <= dt.datetime.now(dt.UTC):
        raise argparse.ArgumentTypeError(f"{text} is in the past (times without an offset are UTC)")
    return text


def client_group(text: str) -> str:
    # "@web" is the group syntax of grants and nested members; here both forms mean the group.
    return text.removeprefix("@")


# --- arguments ---------------------------------------------------------------------------

PROG = "scire-admin"


def _examples(*pairs: tuple[str, str]) -> str:
    lines = ["examples:"]
    for comment, command in pairs:
        lines += [f"  # {comment}", f"  {command}"]
    return "\n".join(lines)


def _command(
    sub: Any, name: str, summary: str, *examples: tuple[str, str], more: str = ""
) -> argparse.ArgumentParser:
    """A sub-command with a one-line summary, examples and, where it matters, more."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + "." + (f"\n\n{more}" if more else ""),
        epilog=_examples(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _area(sub: Any, name: str, summary: str, *examples: tuple[str, str]) -> Any:
    """A command area ("client", "job", ...) whose sub-commands follow."""
    parser = _command(sub, name, summary, *examples)
    return parser.add_subparsers(
        dest=f"{name}_command",
        metavar="COMMAND",
        required=True,
        help=f"one of these (scire-admin {name} COMMAND --help):",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Administer a Scire server: enroll agents, group them, grant rights, "
        "run jobs and follow them.",
        epilog=_examples(
            (
                "create the CA, the server certificate, the database and you, the first admin",
                "scire-admin init --state-dir /var/lib/scire",
            ),
            ("let an agent enroll at once", "scire-admin client token"),
            (
                "run a command on a group and follow it live",
                "scire-admin job submit --group web --command 'uptime' && scire-admin job watch 1",
            ),
            ("the failed jobs, as JSON for a script", "scire-admin --json job list --state failed"),
        )
        + "\n\nconfiguration:\n"
        f"  {DEFAULT_CONFIG} (an [admin] section: server, bundle, timeout) is read when it\n"
        "  exists and -c is not given; flags override it.\n\n" + epilog(PROG),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help=f"INI file with an [admin] section (default {DEFAULT_CONFIG} if it exists)",
    )
    p.add_argument(
        "--server",
        action="append",
        metavar="URL",
        help="server URL (default https://127.0.0.1:8443/); repeat, or separate with commas, "
        "for servers to fail over to, in order",
    )
    p.add_argument(
        "--bundle", type=Path, metavar="FILE", help=f"user bundle (default {DEFAULT_BUNDLE})"
    )
    p.add_argument(
        "--request-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="how long one call may take (default 60)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (anywhere)")
    p.add_argument("--version", action="version", version=f"scire-admin {__version__}")
    sub = p.add_subparsers(
        dest="area", metavar="COMMAND", required=True, help="one of these (COMMAND --help):"
    )

    def offline(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--server-config", type=Path, metavar="FILE", help="the server's INI file ([server])"
        )
        sp.add_argument(
            "--state-dir",
            type=Path,
            metavar="DIR",
            help="the server's state directory (default /var/lib/scire)",
        )
        sp.add_argument(
            "--database-url", metavar="URL", help="SQLAlchemy URL (default: SQLite in DIR)"
        )
        sp.add_argument(
            "--alt-name",
            action="append",
            metavar="NAME",
            help="a name for the server certificate (repeat; default localhost, 127.0.0.1 "
            "and the host name)",
        )

    init = _command(
        sub,
        "init",
        "create the CA, the server certificate, the database and the first administrator (offline)",
        (
            "a server on this machine; the bundle goes to " + str(DEFAULT_BUNDLE),
            "scire-admin init --state-dir /var/lib/scire",
        ),
        (
            "a server that agents reach as scire.example.com",
            "scire-admin init --state-dir /var/lib/scire --alt-name scire.example.com "
            "--alt-name localhost",
        ),
        more=f"With the default --bundle, init also writes {DEFAULT_CONFIG} (server URL and\n"
        "bundle) unless it exists, so the next commands need no flags.",
    )
    offline(init)
    init.add_argument(
        "--listen-port",
        type=positive_int,
        metavar="PORT",
        help="the port the server will listen on (default 8443)",
    )
    init.add_argument(
        "--admin", default="admin", metavar="NAME", help="name of the first administrator"
    )
    init.add_argument(
        "--bundle",
        dest="bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        metavar="FILE",
        help=f"where to write the administrator's bundle (default {DEFAULT_BUNDLE})",
    )
    server_cert = _command(
        sub,
        "server-cert",
        "reissue the server certificate with more names or a new expiry (offline)",
        (
            "agents will also reach the server as scire2.example.com",
            "scire-admin server-cert --state-dir /var/lib/scire --alt-name scire2.example.com",
        ),
        (
            "renew it for another 825 days with the same names",
            "scire-admin server-cert --state-dir /var/lib/scire",
        ),
        more="The certificate keeps every name it has; restart scire-server to serve it.",
    )
    offline(server_cert)
    server_cert.add_argument(
        "--days",
        type=positive_int,
        default=ca.CERT_VALIDITY_DAYS,
        metavar="N",
        help=f"valid for N days from now (default {ca.CERT_VALIDITY_DAYS})",
    )
    db = _command(
        sub,
        "db",
        "upgrade or inspect the database schema (offline)",
        (
            "after installing a new version, before starting it",
            "scire-admin db upgrade --state-dir /var/lib/scire",
        ),
        (
            "which migration the database is at",
            "scire-admin db current --database-url postgresql+psycopg://scire@db/scire",
        ),
    )
    offline(db)
    db.add_argument(
        "db_command",
        choices=["upgrade", "current"],
        metavar="ACTION",
        help="upgrade: migrate to the newest schema; current: show the schema version",
    )

    client = _area(
        sub,
        "client",
        "enrolled agents (clients): list, accept, revoke, tokens",
        ("who is enrolled, and who waits", "scire-admin client list"),
        ("accept a waiting agent", "scire-admin client accept web-17"),
    )
    client_list = _command(
        client,
        "list",
        "list the clients, their status and presence (online or offline, mode, version)",
        ("all clients", "scire-admin client list"),
        ("the accepted clients not heard from lately", "scire-admin client list --offline"),
        ("the clients in group web and its nested groups", "scire-admin client list --group web"),
        ("as JSON", "scire-admin client list --json"),
        more="A client is offline when its agent has not called for offline_after_polls\n"
        "(default 3) times the server's poll_interval.",
    )
    client_list.add_argument(
        "--offline",
        action="store_true",
        help="only accepted clients that are offline",
    )
    client_list.add_argument(
        "--group",
        type=client_group,
        metavar="GROUP",
        help="only the clients in this client group, nested groups included (web or @web)",
    )
    accept = _command(
        client,
        "accept",
        "accept a pending enrollment request (signs its certificate)",
        ("accept web-17's request", "scire-admin client accept web-17"),
        (
            "accept only the key the agent printed",
            "scire-admin client accept web-17 --fingerprint 3f1d...",
        ),
        more="Compare the KEY_FINGERPRINT column of 'client list' with what\n"
        "'scire-client enroll' printed on the host before you accept.",
    )
    accept.add_argument("name", metavar="NAME", help="the client's name (as it enrolled, --name)")
    accept.add_argument(
        "--fingerprint",
        metavar="SHA256",
        help="accept only if the request carries the key with this fingerprint "
        "(what 'scire-client enroll' printed on the agent)",
    )
    for verb, summary in (
        ("show", "a client's details and recent jobs"),
        ("reject", "reject a pending enrollment request"),
        ("revoke", "revoke an accepted client: it may no longer call the server"),
        ("delete", "forget a client and its enrollment"),
    ):
        _command(
            client, verb, summary, (summary, f"scire-admin client {verb} web-17")
        ).add_argument("name", metavar="NAME", help="the client's name (as it enrolled, --name)")
    token = _command(
        client,
        "token",
        "make an enrollment token: an agent that shows it is accepted at once",
        ("one agent, valid for the server's token_ttl", "scire-admin client token"),
        ("ten agents within an hour", "scire-admin client token --uses 10 --ttl 3600"),
    )
    token.add_argument(
        "--uses", type=positive_int, default=1, metavar="N", help="how many agents (default 1)"
    )
    token.add_argument(
        "--ttl",
        type=positive_int,
        metavar="SECONDS",
        help="how long it is valid, at least 60 (default: the server's token_ttl)",
    )

    group = _area(
        sub,
        "group",
        "client groups (nestable) and user groups",
        (
            "a group of web servers",
            "scire-admin group create web && scire-admin group add web web-17 web-18",
        ),
        ("a user group", "scire-admin group create --user ops"),
    )
    for verb, summary, example in (
        ("create", "create a group", "create web"),
        ("delete", "delete a group", "delete web"),
        ("list", "list the groups and their members", "list"),
        ("add", "add members to a group (@group nests a client group)", "add web web-17 @db"),
        ("remove", "remove members from a group", "remove web web-17"),
    ):
        gp = _command(
            group,
            verb,
            summary,
            (summary, f"scire-admin group {example}"),
            (
                "the same for a user group",
                f"scire-admin group {verb} --user"
                + (" ops" if verb != "list" else "")
                + (" alice" if verb in ("add", "remove") else ""),
            ),
        )
        gp.add_argument("--user", action="store_true", help="a user group, not a client group")
        if verb != "list":
            gp.add_argument("name", metavar="GROUP", help="the group's name (without @)")
        if verb in ("add", "remove"):
            gp.add_argument(
                "members",
                nargs="+",
                metavar="MEMBER",
                help="a client (or user), or @group to nest a client group",
            )

    user = _area(
        sub,
        "user",
        "users of scire-admin",
        ("a second administrator", "scire-admin user add bob --admin --out bob.pem"),
    )
    add = _command(
        user,
        "add",
        "create a user and write their bundle (mode 0600)",
        ("a user who may submit what grants allow", "scire-admin user add alice"),
        (
            "an administrator, bundle written to a chosen file",
            "scire-admin user add bob --admin --out ~/bob.pem",
        ),
        more="Give the bundle to the user; they use it with --bundle, or copy it to\n"
        f"{DEFAULT_BUNDLE}.",
    )
    add.add_argument("name", metavar="NAME", help="the user's name")
    add.add_argument("--admin", action="store_true", help="may administer, not only submit jobs")
    add.add_argument("--out", type=Path, metavar="FILE", help="bundle path (default ./NAME.pem)")
    _command(
        user,
        "list",
        "list the users, their rights and groups",
        ("all users", "scire-admin user list"),
    )
    _command(
        user,
        "revoke",
        "revoke a user: their bundle no longer works",
        ("alice left", "scire-admin user revoke alice"),
    ).add_argument("name", metavar="NAME", help="the user's name")

    grant = _area(
        sub,
        "grant",
        "who may run what where",
        ("let the ops group run jobs on the web group", "scire-admin grant add @ops run @web"),
    )
    ga = _command(
        grant,
        "add",
        "allow SUBJECT to run jobs of PRIVILEGE on TARGET",
        ("alice may run plain jobs on web-17", "scire-admin grant add alice run web-17"),
        (
            "the ops user group may do anything on the web client group",
            "scire-admin grant add @ops '*' @web",
        ),
    )
    ga.add_argument("subject", metavar="SUBJECT", help="a user, or @usergroup")
    ga.add_argument(
        "privilege", metavar="PRIVILEGE", help="the job's privilege (submit --privilege), or *"
    )
    ga.add_argument("target", metavar="TARGET", help="a client, or @clientgroup")
    _command(
        grant,
        "remove",
        "remove a grant by its id",
        ("remove grant 3 (ids from grant list)", "scire-admin grant remove 3"),
    ).add_argument("id", type=positive_int, metavar="ID", help="the grant's id (see grant list)")
    _command(
        grant,
        "list",
        "list the grants (a non-admin sees their own)",
        ("all grants", "scire-admin grant list"),
    )

    job = _area(
        sub,
        "job",
        "submit jobs and follow them",
        (
            "run a command on two hosts and wait for it",
            "scire-admin job submit --host web-17 --host web-18 --command 'df -h'",
        ),
        ("follow job 12 live", "scire-admin job watch 12"),
    )
    submit = _command(
        job,
        "submit",
        "submit a script or a command for hosts and/or groups",
        ("a command on one host", "scire-admin job submit --host web-17 --command 'uname -a'"),
        (
            "a script file on a group, at most 10 minutes",
            "scire-admin job submit --group @web --script backup.sh --timeout 600",
        ),
        (
            "from standard input, not before 18:00 UTC",
            "echo 'apt-get -y upgrade' | scire-admin job submit --group web --script - "
            "--privilege root --not-before 2030-01-31T18:00",
        ),
        (
            "every weekday at 03:30 Berlin time, a schedule whose runs are jobs",
            "scire-admin job submit --group web --script backup.sh --cron '30 3 * * 1-5' "
            "--timezone Europe/Berlin",
        ),
        (
            "every 10 minutes, from now on",
            "scire-admin job submit --host web-17 --command 'df -h' --every 10m",
        ),
        more="Prints the job id. Exits 6 (and still prints the id) when some targets were\n"
        "refused, 9 when all were. With --at, --every or --cron it makes a schedule\n"
        "instead and prints its id and next run (see 'scire-admin schedule').",
    )
    what = submit.add_mutually_exclusive_group(required=True)
    what.add_argument("--script", metavar="FILE", help="script file ('-' for standard input)")
    what.add_argument("--command", metavar="TEXT", help="a command string run by the interpreter")
    submit.add_argument("--host", action="append", metavar="CLIENT", help="target client (repeat)")
    submit.add_argument(
        "--group",
        action="append",
        type=client_group,
        metavar="GROUP",
        help="target client group, web or @web (repeat)",
    )
    submit.add_argument("--name", metavar="NAME", help="the job's name (default: the file name)")
    submit.add_argument(
        "--priority", type=priority, default=0, metavar="N", help="-1000..1000, higher first"
    )
    submit.add_argument(
        "--timeout", type=positive_int, metavar="SECONDS", help="seconds before the job is killed"
    )
    submit.add_argument(
        "--privilege",
        default="run",
        metavar="NAME",
        help="the privilege the job needs on each host (default run)",
    )
    submit.add_argument(
        "--interpreter",
        metavar="PATH",
        help="default: the script's #! line, else /bin/sh (the server's default_interpreter)",
    )
    submit.add_argument(
        "--not-before",
        type=iso_time,
        metavar="TIME",
        help="ISO 8601 time (UTC unless it has an offset)",
    )
    submit.add_argument(
        "--expires",
        type=future_time,
        metavar="TIME",
        help="ISO 8601 time after which it is not started (in the future)",
    )
    submit.add_argument(
        "--max-attempts", type=positive_int, metavar="N", help="deliveries before it fails"
    )
    submit.add_argument(
        "--output-limit", type=positive_int, metavar="BYTES", help="bytes of output kept per host"
    )
    submit.add_argument(
        "--rerun-on-agent-crash",
        action="store_true",
        help="run it again if the agent died while it ran",
    )
    when = submit.add_argument_group(
        "schedules",
        "With one of --at, --every or --cron the submission makes a schedule, not a job: "
        "each run is a job of its own, made when due.",
    ).add_mutually_exclusive_group()
    when.add_argument(
        "--at",
        metavar="TIME",
        help="one run at this time: ISO 8601, e.g. '2026-12-01 03:00' (in --timezone unless it "
        "has an offset)",
    )
    when.add_argument(
        "--every",
        metavar="DURATION",
        help="a run now and then every DURATION: 30s, 10m, 2h, 1d, 1h30m (at least 1s)",
    )
    when.add_argument(
        "--cron",
        metavar="EXPR",
        help="a run at each time of a five-field cron expression, e.g. '30 3 * * 1-5' "
        "(in --timezone)",
    )
    submit.add_argument(
        "--timezone",
        metavar="ZONE",
        help="IANA time zone of --cron and of an --at without offset (default UTC)",
    )
    submit.add_argument(
        "--catch-up",
        choices=[c.value for c in CatchUp],
        metavar="POLICY",
        help="after the server was down over several slots: once (default: one run), "
        "all (a run per slot) or skip (none)",
    )
    submit.add_argument(
        "--allow-overlap",
        action="store_true",
        help="start a run on a host even while the schedule's previous run is active there",
    )
    submit.add_argument(
        "--request-key",
        metavar="KEY",
        help="idempotency key (8-64 characters, e.g. a UUID; default: a new UUID): "
        "submitting again with the same key returns the first job",
    )
    many = _command(
        job,
        "submit-many",
        "submit many jobs from a file of JSON lines, over one connection",
        (
            "one job per line",
            "scire-admin job submit-many jobs.jsonl",
        ),
        (
            "from a script's output",
            'for h in web-1 web-2; do echo \'{"hosts": ["\'$h\'"], "command": "uptime"}\'; '
            "done | scire-admin job submit-many -",
        ),
        more="Each line is a JSON object with the keys of 'job submit': \"command\" (or\n"
        '"script", the text), "hosts", "groups", "name", "priority", "timeout",\n'
        '"privilege", "interpreter", "not_before", "expires", "max_attempts",\n'
        '"output_limit", "rerun_on_agent_crash", "request_key". Every line is checked\n'
        "before anything is sent. A line without a request_key gets one made from the\n"
        "file's content and the line number, so running the same file again submits\n"
        "nothing twice. Prints one line per job; exits 6 when some targets were\n"
        "refused, 1 when a job was refused (the others are submitted all the same).",
    )
    many.add_argument("file", metavar="FILE", help="the JSON lines ('-' for standard input)")
    jl = _command(
        job,
        "list",
        "list the newest jobs",
        ("the last 50 jobs", "scire-admin job list"),
        ("the 20 newest failed jobs", "scire-admin job list --state failed --limit 20"),
        ("the page before job 1200", "scire-admin job list --before 1200"),
        ("every job, as JSON", "scire-admin --json job list --all"),
        more="A full page ends with the command that shows the one before it.",
    )
    jl.add_argument(
        "--state",
        choices=JOB_SUMMARIES,
        metavar="STATE",
        help="only jobs in this state: " + ", ".join(JOB_SUMMARIES),
    )
    jl.add_argument(
        "--limit",
        type=positive_int,
        default=50,
        metavar="N",
        help="how many of the newest jobs (default 50, at most 10000)",
    )
    jl.add_argument(
        "--before",
        type=positive_int,
        metavar="ID",
        help="only jobs older than job ID (the next page)",
    )
    jl.add_argument("--all", action="store_true", help="every job, page after page")
    for verb, summary in (
        ("show", "a job: its hosts, their states and output"),
        ("cancel", "cancel a job on the hosts where it has not finished"),
    ):
        _command(job, verb, summary, (summary, f"scire-admin job {verb} 12")).add_argument(
            "id", type=positive_int, metavar="ID", help="the job's id"
        )
    jretry = _command(
        job,
        "retry",
        "run a finished job again on its failed and timed-out hosts",
        ("every host of job 12 that failed or timed out", "scire-admin job retry 12"),
        (
            "only web-17, then wait for it",
            "scire-admin job retry 12 --host web-17 && scire-admin job wait 12",
        ),
        more="The same job, a new attempt on each retried host: the previous attempt's\n"
        "state, exit code and output stay in the audit trail (scire-admin audit --job ID).\n"
        "Refused (exit 1) while the job runs, after a cancel or its expiry, or when no\n"
        "host failed. Exits 6 when some hosts were refused (client no longer accepted).",
    )
    jretry.add_argument("id", type=positive_int, metavar="ID", help="the job's id")
    jretry.add_argument(
        "--host",
        action="append",
        metavar="CLIENT",
        help="retry only this host (repeat); default: every failed or timed-out host",
    )
    jw = _command(
        job,
        "wait",
        "wait until every host has finished, then show the job",
        (
            "in a script: stop when a host failed",
            "scire-admin job wait 12 --timeout 600 || echo 'job 12 did not succeed everywhere'",
        ),
        more="Exits 0 when every host succeeded, 5 when some did not, 7 when --timeout ran out.",
    )
    jw.add_argument("id", type=positive_int, metavar="ID", help="the job's id")
    jw.add_argument(
        "--timeout",
        type=positive_seconds,
        default=300.0,
        metavar="SECONDS",
        help="give up after this long (default 300)",
    )
    joutput = _command(
        job,
        "output",
        "one host's output of a job, live while it runs",
        ("what web-17 printed so far", "scire-admin job output 12 --host web-17"),
        ("tail it until the job ends there", "scire-admin job output 12 --host web-17 --follow"),
        more="While a job runs its agent sends the output so far every heartbeat_interval,\n"
        "so --follow prints new text as it arrives (up to the job's output limit).\n"
        "With --json, one object per new piece: text, state, final, truncated.\n"
        "Exits like job wait for that host: 0 succeeded, 5 it did not, 7 --timeout\n"
        "ran out (without --follow: 0 while it runs).",
    )
    joutput.add_argument("id", type=positive_int, metavar="ID", help="the job's id")
    joutput.add_argument("--host", required=True, metavar="NAME", help="the host (client) name")
    joutput.add_argument(
        "-f", "--follow", action="store_true", help="print new output until the host has finished"
    )
    joutput.add_argument(
        "--timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="with --follow: give up after this long (default: never)",
    )
    jwatch = _command(
        job,
        "watch",
        "follow a job live across its hosts until all are final",
        ("a progress bar and the slowest hosts", "scire-admin job watch 12"),
        ("one JSON object per change, for a script", "scire-admin job watch 12 --json"),
        more="On a terminal: a progress bar with pending / sent / running / succeeded /\n"
        "failed / denied counts and the slowest hosts. Otherwise one line per change.\n"
        "Exits like job wait: 0 all succeeded, 5 some did not, 7 --timeout ran out.",
    )
    jwatch.add_argument("id", type=positive_int, metavar="ID", help="the job's id")
    jwatch.add_argument(
        "--timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="give up after this long (default: never)",
    )

    cert = _area(
        sub,
        "cert",
        "your own certificate",
        ("a new certificate for your bundle", "scire-admin cert renew"),
    )
    _command(
        cert,
        "renew",
        "replace your certificate: a new key, signed by the server, written to your bundle",
        ("renew the bundle in use", "scire-admin cert renew"),
        ("renew another bundle", "scire-admin --bundle ~/alice.pem cert renew"),
        more="The new certificate works at once; the old one is refused from then on\n"
        "(docs/SECURITY.md, Renewal). The bundle is replaced in one atomic write.",
    )

    schedule = _area(
        sub,
        "schedule",
        "schedules made by job submit --at, --every or --cron",
        ("every schedule you may see", "scire-admin schedule list"),
        ("stop schedule 3 for now", "scire-admin schedule pause 3"),
    )
    _command(
        schedule,
        "list",
        "list the schedules (a non-admin sees their own)",
        ("active, paused and finished schedules", "scire-admin schedule list"),
        ("deleted ones too", "scire-admin schedule list --all"),
    ).add_argument("--all", action="store_true", help="deleted schedules too")
    for verb, summary in (
        ("show", "a schedule: when it runs, its targets and its newest runs"),
        ("pause", "make no runs until resumed (runs already made go on)"),
        ("resume", "make runs again from the next slot on"),
        ("delete", "make no runs ever again (runs already made go on)"),
    ):
        _command(schedule, verb, summary, (summary, f"scire-admin schedule {verb} 3")).add_argument(
            "id", type=positive_int, metavar="ID", help="the schedule's id"
        )

    audit = _command(
        sub,
        "audit",
        "the audit trail",
        ("what happened to job 12", "scire-admin audit --job 12"),
        ("the last 20 events of web-17", "scire-admin audit --client web-17 --limit 20"),
    )
    audit.add_argument("--job", type=positive_int, metavar="ID", help="only this job's events")
    audit.add_argument("--client", metavar="NAME", help="only this client's events")
    audit.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="newest N events (default 100)"
    )
    _command(
        sub,
        "server",
        "server daemons sharing the database",
        ("which daemons are alive", "scire-admin server list"),
    ).add_argument("server_command", choices=["list"], metavar="ACTION", help="list: the daemons")
    completion = _command(
        sub,
        "completion",
        "print a shell completion script (bash or zsh)",
        ("bash, for this shell", 'eval "$(scire-admin completion bash)"'),
        (
            "bash, for good",
            "scire-admin completion bash | sudo tee /etc/bash_completion.d/scire-admin",
        ),
        ("zsh", 'scire-admin completion zsh > "${fpath[1]}/_scire-admin"'),
    )
    completion.add_argument("shell", choices=["bash", "zsh"], metavar="SHELL", help="bash or zsh")
    return p


ONLINE = {
    "client": cmd_client,
    "group": cmd_group,
    "user": cmd_user,
    "grant": cmd_grant,
    "job": cmd_job,
    "schedule": cmd_schedule,
    "audit": cmd_audit,
    "server": cmd_server,
    "cert": cmd_cert,
}
OFFLINE = {
    "init": cmd_init,
    "server-cert": cmd_server_cert,
    "db": cmd_db,
    "completion": cmd_completion,
}


def admin_config(args: argparse.Namespace) -> AdminConfig:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.expanduser().exists():
        path = DEFAULT_CONFIG.expanduser()
    servers = None
    if args.server:
        servers = [url for item in args.server for url in inifile.split_list(item)]
    return AdminConfig.load(path, server=servers, bundle=args.bundle, timeout=args.request_timeout)


def run(args: argparse.Namespace) -> ExitCode:
    if args.area in OFFLINE:
        return OFFLINE[args.area](args)
    config = admin_config(args)
    connection = connect(config)
    try:
        return ONLINE[args.area](args, connection)
    except ConnectionFailure as exc:
        if exc.worded:
            raise CLIError(str(exc), exc.code) from exc
        raise CLIError(explain(exc.cause, exc.url or config.server[0]), exc.code) from exc
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --json is welcome anywhere on the line, as operators type it last.
    json_flag = "--json" in argv
    args = build_parser().parse_args([a for a in argv if a != "--json"])
    args.json = args.json or json_flag
    try:
        code = run(args)
        sys.stdout.flush()
        return code
    except CLIError as exc:
        return fail(str(exc), exc.code)
    except ConfigError as exc:
        return fail(exc.message, ExitCode.USAGE)
    except ScireError as exc:
        return fail(exc.message, FAULT_EXIT_CODES.get(exc.code, ExitCode.ERROR))
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return quiet_after_broken_pipe()
        # A full disk or a read-only directory in init, db or a bundle write.
        where = f" ({exc.filename})" if exc.filename else ""
        return fail(f"{exc.strerror or exc}{where}", ExitCode.ERROR)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def fail(message: str, code: ExitCode) -> int:
    try:
        print(f"scire-admin: {message}", file=sys.stderr)
    except BrokenPipeError:
        pass
    return code


def quiet_after_broken_pipe() -> int:
    """The reader of our output went away (``| head``): stop without a word.

    Python would complain again when it flushes stdout at exit, so stdout is
    pointed at /dev/null first, as the ``signal`` module's documentation advises.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
