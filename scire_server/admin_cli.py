"""``scire-admin``: the administrator's command line.

Everything but ``init`` and ``db`` goes through the server's admin API over
mutual TLS with a user bundle (key, certificate and CA in one 0600 PEM file).
``init`` and ``db`` work offline on the state directory and the database.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import ssl
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from scire_schema import certs, files, tls
from scire_server import __version__, ca, migrations, store
from scire_server.config import AdminConfig, ServerConfig
from scire_server.exceptions import FAULT_NAMES, ScireError
from scire_server.states import FINAL_SUMMARIES

DEFAULT_BUNDLE = Path("~/.config/scire/admin.pem")


class CLIError(Exception):
    """A failure worth one line to the operator, and exit status 1."""


# --- the admin API connection -------------------------------------------------

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.S)


def write_bundle(path: Path, key_pem: bytes, cert_pem: str, ca_pem: str) -> None:
    files.write_private(path, key_pem + cert_pem.encode() + ca_pem.encode())


def connect(config: AdminConfig) -> Any:
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
    return xmlrpc.client.ServerProxy(
        config.server, transport=tls.TLSTransport(context, config.timeout), allow_none=True
    )


def call(proxy: Any, method: str, *args: Any) -> Any:
    try:
        return getattr(proxy, method)(*args)
    except xmlrpc.client.Fault as exc:
        name = FAULT_NAMES.get(exc.faultCode, "Fault")
        raise CLIError(f"{exc.faultString} ({name}, fault {exc.faultCode})") from exc
    except ssl.SSLError as exc:
        raise CLIError(f"TLS with the server failed: {exc.reason or exc}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise CLIError(f"cannot reach the server: {exc}") from exc


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


def cmd_init(args: argparse.Namespace) -> None:
    config = server_config(args)
    if config.ca_key_file.exists():
        raise CLIError(f"{config.state_dir} holds a CA already; init does not overwrite it")
    check_bundle_target(args.bundle)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.state_dir, 0o700)
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
    migrations.upgrade(config.database_url)
    user_key = certs.generate_key()
    user_cert = ca.sign_csr(
        ca_key, ca_cert, certs.make_csr(user_key, args.admin), args.admin, ca.ROLE_USER
    )
    db = store.Store(store.make_engine(config.database_url), "scire-admin init")
    try:
        db.directory.add_user(args.admin, certs.fingerprint(user_cert), True, "scire-admin init")
    finally:
        db.close()
    ca_pem = certs.cert_to_pem(ca_cert).decode()
    write_bundle(
        args.bundle, certs.key_to_pem(user_key), certs.cert_to_pem(user_cert).decode(), ca_pem
    )
    show(
        args,
        {
            "state_dir": str(config.state_dir),
            "database": config.database_url,
            "server_names": config.alt_names,
            "admin": args.admin,
            "bundle": str(args.bundle),
            "ca_fingerprint": certs.fingerprint(ca_cert),
        },
    )


def check_bundle_target(path: Path) -> None:
    if path.exists():
        raise CLIError(f"{path} exists already; choose another --bundle path")


def cmd_db(args: argparse.Namespace) -> None:
    config = server_config(args)
    if args.db_command == "upgrade":
        before, head = migrations.current(config.database_url)
        migrations.upgrade(config.database_url)
        show(args, {"database": config.database_url, "from": before or "empty", "to": head})
    else:
        current, head = migrations.current(config.database_url)
        show(args, {"database": config.database_url, "current": current or "empty", "head": head})


# --- online commands -----------------------------------------------------------------


def cmd_client(args: argparse.Namespace, proxy: Any) -> None:
    sub = args.client_command
    if sub == "list":
        show(
            args,
            call(proxy, "admin.client_list"),
            ["name", "status", "active_jobs", "last_seen_at", "registered_at"],
        )
    elif sub == "show":
        detail = call(proxy, "admin.client_show", args.name)
        if args.json:
            show(args, detail)
            return
        recent = detail.pop("recent_jobs")
        show(args, detail)
        print("\nrecent jobs:")
        print(table(recent, ["job_id", "name", "state", "updated_at"]))
    elif sub == "token":
        show(args, call(proxy, "admin.client_token", args.uses, args.ttl))
    else:
        show(args, call(proxy, f"admin.client_{sub}", args.name))


def cmd_group(args: argparse.Namespace, proxy: Any) -> None:
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


def cmd_user(args: argparse.Namespace, proxy: Any) -> None:
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
        out = args.out or Path(f"{args.name}.pem")
        check_bundle_target(out)
        key = certs.generate_key()
        answer = call(
            proxy, "admin.user_add", args.name, certs.make_csr(key, args.name).decode(), args.admin
        )
        write_bundle(out, certs.key_to_pem(key), answer["certificate"], answer["ca"])
        show(args, {"name": args.name, "admin": args.admin, "bundle": str(out)})


def cmd_grant(args: argparse.Namespace, proxy: Any) -> None:
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


def _read_script(args: argparse.Namespace) -> str:
    # Read as bytes: text mode would turn \r\n into \n, and the script must arrive byte-exact.
    if args.command:
        return str(args.command)
    try:
        if str(args.script) == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(args.script).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read the script {args.script}: {exc}") from exc


def cmd_job(args: argparse.Namespace, proxy: Any) -> None:
    sub = args.job_command
    if sub == "submit":
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
        }
        answer = call(proxy, "admin.job_submit", {k: v for k, v in spec.items() if v is not None})
        if args.json:
            show(args, answer)
        else:
            print(f"job {answer['job_id']} submitted for {', '.join(answer['accepted'])}")
            for why in answer["refused"]:
                print(f"refused: {why}")
    elif sub == "list":
        show(
            args,
            call(proxy, "admin.job_list", args.limit, args.state or ""),
            ["id", "name", "owner", "priority", "state", "states", "created_at"],
        )
    elif sub == "show":
        show_job(args, call(proxy, "admin.job_show", args.id))
    elif sub == "cancel":
        show(args, call(proxy, "admin.job_cancel", args.id))
    elif sub == "wait":
        deadline = time.monotonic() + args.timeout
        while True:
            detail = call(proxy, "admin.job_show", args.id)
            if detail["state"] in FINAL_SUMMARIES or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        show_job(args, detail)
        if detail["state"] not in FINAL_SUMMARIES:
            raise CLIError(f"job {args.id} still {detail['state']} after {args.timeout} s")


def show_job(args: argparse.Namespace, detail: dict[str, Any]) -> None:
    if args.json:
        show(args, detail)
        return
    print(f"job {detail['id']} ({detail['name']}) by {detail['owner']}: {detail['state']}")
    print(
        f"  priority {detail['priority']}, timeout {detail['timeout']} s, "
        f"privilege {detail['privilege']}, created {_cell(detail['created_at'])}"
    )
    print(
        table(
            detail["assignments"],
            ["client", "state", "attempt", "exit_code", "started_at", "finished_at", "reason"],
        )
    )
    for a in detail["assignments"]:
        if a.get("output") is not None:
            flag = " (truncated)" if a["output_truncated"] else ""
            print(f"--- output of {a['client']}{flag} ---")
            print(a["output"].rstrip("\n"))


def cmd_audit(args: argparse.Namespace, proxy: Any) -> None:
    show(
        args,
        call(proxy, "admin.audit", args.job or 0, args.client or "", args.limit),
        ["at", "actor", "action", "job_id", "client", "old_state", "new_state", "detail"],
    )


def cmd_server(args: argparse.Namespace, proxy: Any) -> None:
    show(
        args,
        call(proxy, "admin.server_list"),
        ["instance_key", "hostname", "pid", "state", "heartbeat_at", "url"],
    )


# --- arguments ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scire-admin", description="Administer a Scire server.")
    p.add_argument("-c", "--config", type=Path, help="INI file with an [admin] section")
    p.add_argument("--server", help="server URL (default https://127.0.0.1:8443/)")
    p.add_argument("--bundle", type=Path, help=f"user bundle (default {DEFAULT_BUNDLE})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--version", action="version", version=f"scire-admin {__version__}")
    sub = p.add_subparsers(dest="area", required=True)

    def offline(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--server-config", type=Path, help="the server's INI file ([server])")
        sp.add_argument("--state-dir", type=Path)
        sp.add_argument("--database-url")
        sp.add_argument("--alt-name", action="append", help="server certificate name (repeat)")

    init = sub.add_parser(
        "init",
        help="create the CA, the server certificate, the database "
        "and the first administrator (offline)",
    )
    offline(init)
    init.add_argument("--listen-port", type=int)
    init.add_argument("--admin", default="admin", help="name of the first administrator")
    init.add_argument(
        "--bundle",
        dest="bundle",
        type=Path,
        default=Path("admin.pem"),
        help="where to write the administrator's bundle (default ./admin.pem)",
    )
    db = sub.add_parser("db", help="database schema (offline)")
    offline(db)
    db.add_argument("db_command", choices=["upgrade", "current"])

    client = sub.add_parser("client", help="enrolled agents").add_subparsers(
        dest="client_command", required=True
    )
    client.add_parser("list")
    for name in ("show", "accept", "reject", "revoke", "delete"):
        client.add_parser(name).add_argument("name")
    token = client.add_parser("token", help="an enrollment token that signs requests at once")
    token.add_argument("--uses", type=int, default=1)
    token.add_argument("--ttl", type=int, default=0, help="seconds (default: server's token_ttl)")

    group = sub.add_parser("group", help="client groups (nestable) and user groups").add_subparsers(
        dest="group_command", required=True
    )
    for name in ("create", "delete", "list", "add", "remove"):
        gp = group.add_parser(name)
        gp.add_argument("--user", action="store_true", help="a user group, not a client group")
        if name != "list":
            gp.add_argument("name")
        if name in ("add", "remove"):
            gp.add_argument("members", nargs="+", help="client, user, or @group to nest")

    user = sub.add_parser("user", help="users of scire-admin").add_subparsers(
        dest="user_command", required=True
    )
    add = user.add_parser("add", help="create a user and write their bundle (mode 0600)")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may administer, not only submit jobs")
    add.add_argument("--out", type=Path, help="bundle path (default ./NAME.pem)")
    user.add_parser("list")
    user.add_parser("revoke").add_argument("name")

    grant = sub.add_parser("grant", help="who may run what where").add_subparsers(
        dest="grant_command", required=True
    )
    ga = grant.add_parser(
        "add", help="SUBJECT (user or @usergroup) PRIVILEGE (or *) TARGET (client or @clientgroup)"
    )
    ga.add_argument("subject")
    ga.add_argument("privilege")
    ga.add_argument("target")
    grant.add_parser("remove").add_argument("id", type=int)
    grant.add_parser("list")

    job = sub.add_parser("job", help="jobs").add_subparsers(dest="job_command", required=True)
    submit = job.add_parser("submit", help="submit a script for hosts and/or groups")
    what = submit.add_mutually_exclusive_group(required=True)
    what.add_argument("--script", help="script file ('-' for standard input)")
    what.add_argument("--command", help="a command string run by the interpreter")
    submit.add_argument("--host", action="append", help="target client (repeat)")
    submit.add_argument("--group", action="append", help="target client group (repeat)")
    submit.add_argument("--name")
    submit.add_argument("--priority", type=int, default=0, help="-1000..1000, higher first")
    submit.add_argument("--timeout", type=int, help="seconds before the job is killed")
    submit.add_argument("--privilege", default="run")
    submit.add_argument("--interpreter", help="default /bin/sh")
    submit.add_argument("--not-before", help="ISO 8601 time (UTC unless it has an offset)")
    submit.add_argument("--expires", help="ISO 8601 time after which it is not started")
    submit.add_argument("--max-attempts", type=int)
    submit.add_argument("--output-limit", type=int, help="bytes of output kept per host")
    submit.add_argument("--rerun-on-agent-crash", action="store_true")
    jl = job.add_parser("list")
    jl.add_argument("--state")
    jl.add_argument("--limit", type=int, default=50)
    job.add_parser("show").add_argument("id", type=int)
    job.add_parser("cancel").add_argument("id", type=int)
    jw = job.add_parser("wait", help="wait until every host has finished, then show the job")
    jw.add_argument("id", type=int)
    jw.add_argument("--timeout", type=float, default=300.0)

    audit = sub.add_parser("audit", help="the audit trail")
    audit.add_argument("--job", type=int)
    audit.add_argument("--client")
    audit.add_argument("--limit", type=int, default=100)
    sub.add_parser("server", help="server daemons").add_argument("server_command", choices=["list"])
    return p


ONLINE = {
    "client": cmd_client,
    "group": cmd_group,
    "user": cmd_user,
    "grant": cmd_grant,
    "job": cmd_job,
    "audit": cmd_audit,
    "server": cmd_server,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --json is welcome anywhere on the line, as operators type it last.
    json_flag = "--json" in argv
    args = build_parser().parse_args([a for a in argv if a != "--json"])
    args.json = args.json or json_flag
    try:
        if args.area == "init":
            cmd_init(args)
        elif args.area == "db":
            cmd_db(args)
        else:
            config = AdminConfig.load(args.config, server=args.server, bundle=args.bundle)
            ONLINE[args.area](args, connect(config))
    except (CLIError, ScireError) as exc:
        print(f"scire-admin: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("scire-admin: the server did not answer in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
