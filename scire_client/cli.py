"""``scire-client``: the agent's command line.

Commands: ``run`` (enroll if needed, then normal mode: one pass), ``daemon``
(enroll if needed, then daemon mode until SIGTERM), ``enroll`` (enroll only)
and ``spool`` (list the spool). Without a command, ``mode`` in the
configuration decides: ``once`` (the default) runs, ``daemon`` serves. Exit codes come from
``scire_schema.exitcodes``: 0 ok, 1 error (also when ``run`` carried on past a
disk or spool failure, such as a job it could not spool), 2 bad configuration or usage, 3 enrollment
pending, 4 enrollment refused. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from scire_client import __version__, agent, daemon, enroll, lock, renewal
from scire_client.config import ClientConfig
from scire_client.exceptions import (
    AgentBusy,
    ClientError,
    ConfigError,
    EnrollmentPending,
    EnrollmentRefused,
    SpoolError,
)
from scire_client.spool import Spool
from scire_client.transport import ServerTransport
from scire_schema import certs, inifile, logformat
from scire_schema.errors import SchemaError
from scire_schema.exitcodes import ExitCode, epilog
from scire_schema.protocol import AgentMode

log = logging.getLogger("scire_client")

EXIT_OK = ExitCode.OK
EXIT_ERROR = ExitCode.ERROR
EXIT_USAGE = ExitCode.USAGE
EXIT_PENDING = ExitCode.ENROLLMENT_PENDING
EXIT_REFUSED = ExitCode.ENROLLMENT_REFUSED
#: Read when -c is not given and the file exists.
DEFAULT_CONFIG = Path("/etc/scire/client.ini")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scire-client",
        description="Scire agent: enroll, poll the server for jobs, run them, report.",
        epilog="examples:\n"
        "  # enroll with a token from 'scire-admin client token'\n"
        "  scire-client --server https://scire:8443/ --state-dir /var/lib/scire-client \\\n"
        "      --name web-17 --token TOKEN --ca-fingerprint FINGERPRINT enroll\n"
        "  # poll once, run what came, report (cron does this every minute)\n"
        "  scire-client -c /etc/scire/client.ini run\n"
        "  # daemon mode: poll every minute, run two jobs at once, take poll_now hints\n"
        "  scire-client -c /etc/scire/client.ini --max-parallel 2 --listen 10.0.0.17:8444 daemon\n"
        "  # what the spool holds, as JSON\n"
        "  scire-client --state-dir /var/lib/scire-client spool --json\n"
        "  # a new certificate now, the old one refused from then on\n"
        "  scire-client renew\n\n"
        f"configuration:\n  the [client] section of FILE (default {DEFAULT_CONFIG} if it exists);\n"
        "  flags override it.\n\n"
        + epilog("scire-client")
        + "\n  run exits 1 after a disk or spool failure, e.g. a job it could not spool.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", type=Path, metavar="FILE", help="INI file")
    parser.add_argument(
        "--server",
        action="append",
        metavar="URL",
        help="server URL, e.g. https://scire1:8443/; repeat in failover order",
    )
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="key, certificates, spool")
    parser.add_argument("--name", help="client name (default: the host name)")
    parser.add_argument("--token", metavar="TOKEN", help="enrollment token")
    parser.add_argument(
        "--ca-fingerprint",
        metavar="HEX",
        help="SHA-256 of the CA certificate, to check a fetched CA",
    )
    parser.add_argument(
        "--enroll-wait",
        type=float,
        metavar="SECONDS",
        help="how long to wait for an administrator to accept the enrollment",
    )
    parser.add_argument(
        "--failback-after",
        type=float,
        metavar="SECONDS",
        help="after a failover, when to try the first server again (default 300)",
    )
    daemon_mode = parser.add_argument_group("daemon mode")
    daemon_mode.add_argument(
        "--poll-interval", type=float, metavar="SECONDS", help="between polls (default 60)"
    )
    daemon_mode.add_argument(
        "--poll-jitter",
        type=float,
        metavar="FRACTION",
        help="each wait varies by up to this fraction (default 0.1)",
    )
    daemon_mode.add_argument(
        "--max-parallel", type=int, metavar="N", help="jobs at once (default 1)"
    )
    daemon_mode.add_argument(
        "--shutdown-grace",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, time running jobs get before they are killed (default 30)",
    )
    daemon_mode.add_argument(
        "--listen", metavar="HOST:PORT", help="serve poll_now there (default: no listener)"
    )
    daemon_mode.add_argument(
        "--advertise", metavar="HOST:PORT", help="the address the server calls (default: --listen)"
    )
    daemon_mode.add_argument("--pid-file", type=Path, metavar="FILE", help="write the daemon's pid")
    daemon_mode.add_argument(
        "--renew-before",
        type=float,
        metavar="DAYS",
        help="renew the certificate this close to its expiry (default 30; 0 = never)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--log-format", choices=logformat.FORMATS, help="text (default) or json lines"
    )
    parser.add_argument("--json", action="store_true", help="spool: machine-readable output")
    parser.add_argument("--version", action="version", version=f"scire-client {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "daemon", "enroll", "spool", "renew"),
        help="run: enroll if needed, run the jobs, exit; daemon: enroll if needed, then poll "
        "and run jobs until SIGTERM; enroll: only enroll; spool: list the spool; renew: "
        "replace the agent's certificate now (the daemon does it by itself renew_before "
        "days before expiry). "
        "Default: daemon with mode = daemon in the configuration, else run",
    )
    return parser


def load_config(args: argparse.Namespace) -> ClientConfig:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    servers = None
    if args.server:
        servers = [url for item in args.server for url in inifile.split_list(item)]
    return ClientConfig.load(
        path,
        require_servers=args.command != "spool",
        servers=servers,
        state_dir=args.state_dir,
        name=args.name,
        enrollment_token=args.token,
        ca_fingerprint=args.ca_fingerprint,
        enroll_wait=args.enroll_wait,
        failback_after=args.failback_after,
        poll_interval=args.poll_interval,
        poll_jitter=args.poll_jitter,
        max_parallel=args.max_parallel,
        shutdown_grace=args.shutdown_grace,
        listen=args.listen,
        advertise=args.advertise,
        pid_file=args.pid_file,
        renew_before=args.renew_before,
        log_format=args.log_format,
    )


class _SpoolFailures(logging.Handler):
    """Counts the local disk or spool failures the agent logs and carries on past,
    such as a job it could not spool (disk full): the error's object is in the
    record's arguments."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(arg, (OSError, SpoolError)) for arg in args):
            self.count += 1


def cmd_run(config: ClientConfig, args: argparse.Namespace) -> int:
    # The agent logs and carries on past a job it cannot spool (the server
    # sends it again); the exit code must still tell cron or a script.
    errors = _SpoolFailures()
    log.addHandler(errors)
    try:
        code = agent.run(config)
    except AgentBusy as exc:
        # Cron started us while the last run still works: that run does the job.
        log.info("%s; leaving the work to it", exc)
        return EXIT_OK
    finally:
        log.removeHandler(errors)
    if code == EXIT_OK and errors.count:
        print(
            f"scire-client: error: {errors.count} spool or disk failure(s) during the run "
            "(see above)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return code


def cmd_daemon(config: ClientConfig, args: argparse.Namespace) -> int:
    return daemon.run(config)


def cmd_enroll(config: ClientConfig, args: argparse.Namespace) -> int:
    def show_request(key_fingerprint: str) -> None:
        # On stdout before the wait, so the operator can compare it while pending.
        print(f"enrollment request of {config.name}: key fingerprint {key_fingerprint}", flush=True)

    with lock.hold(config.lock_file):
        if enroll.ensure_enrolled(config, on_request=show_request):
            print(f"enrolled as {config.name}: {config.cert_file}")
        else:
            print(f"already enrolled as {config.name}: {config.cert_file}")
    return EXIT_OK


def cmd_renew(config: ClientConfig, args: argparse.Namespace) -> int:
    with lock.hold(config.lock_file):
        if not enroll.is_enrolled(config):
            raise ConfigError(f"not enrolled yet ({config.cert_file} is missing): run enroll first")
        renewal.finish_interrupted(config)
        transport = ServerTransport(config)
        try:
            cert = renewal.renew(config, transport)
        finally:
            transport.close()
    print(
        f"renewed {config.name}: {config.cert_file}, fingerprint {certs.fingerprint(cert)}, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )
    return EXIT_OK


def cmd_spool(config: ClientConfig, args: argparse.Namespace) -> int:
    spool = Spool(config.spool_dir) if config.spool_dir.exists() else None
    entries = spool.entries() if spool else []
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "job_id": e.job_id,
                        "name": e.name,
                        "state": e.state,
                        "priority": e.priority,
                        "delivery_id": e.delivery_id,
                        "received_at": e.created.isoformat(),
                        "started_at": e.started_at.isoformat() if e.started_at else None,
                        "cancelled": spool.cancel_reason(e.job_id) if spool else None,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return EXIT_OK
    if spool is None:
        return EXIT_OK
    rows = [(str(e.job_id), e.state, spool.cancel_reason(e.job_id) or "", e.name) for e in entries]
    table = [("JOB", "STATE", "CANCELLED", "NAME"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        print(*cells, row[3], sep="  ")
    return EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "daemon": cmd_daemon,
    "enroll": cmd_enroll,
    "spool": cmd_spool,
    "renew": cmd_renew,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # Text until the configuration says otherwise: loading it may log already.
    logformat.configure("scire-client", logging.DEBUG if args.verbose else logging.INFO)
    try:
        config = load_config(args)
        logformat.configure(
            "scire-client",
            logging.DEBUG if args.verbose else logging.INFO,
            config.log_format,
            defaults=logformat.event(client=config.name),
        )
        command = args.command or ("daemon" if config.mode == AgentMode.DAEMON else "run")
        return COMMANDS[command](config, args)
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE)
    except EnrollmentPending as exc:
        return _fail(exc, EXIT_PENDING)
    except EnrollmentRefused as exc:
        return _fail(exc, EXIT_REFUSED)
    except ClientError as exc:
        return _fail(exc, EXIT_ERROR)
    except (OSError, SchemaError) as exc:  # a full disk; a damaged document in the spool
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        print("scire-client: interrupted", file=sys.stderr)
        return 130


def _fail(exc: Exception, code: int) -> int:
    print(f"scire-client: error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
