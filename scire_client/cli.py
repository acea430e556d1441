"""``scire-client``: the agent's command line.

Commands: ``run`` (the default: enroll if needed, then normal mode),
``enroll`` (enroll only) and ``spool`` (list the spool). Exit codes: 0 ok,
1 error, 2 bad configuration or usage, 3 enrollment pending, 4 enrollment
refused. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from scire_client import __version__, agent, enroll, lock
from scire_client.config import ClientConfig
from scire_client.exceptions import (
    AgentBusy,
    ClientError,
    ConfigError,
    EnrollmentPending,
    EnrollmentRefused,
)
from scire_client.spool import Spool
from scire_schema import inifile
from scire_schema.errors import SchemaError

log = logging.getLogger("scire_client")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PENDING = 3
EXIT_REFUSED = 4
#: Read when -c is not given and the file exists.
DEFAULT_CONFIG = Path("/etc/scire/client.ini")
LOG_FORMAT = "%(asctime)s scire-client[%(process)d] %(levelname)s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scire-client",
        description="Scire agent: enroll, poll the server for jobs, run them, report.",
        epilog=f"Configuration: the [client] section of FILE (default {DEFAULT_CONFIG} if it "
        "exists); flags override it. Exit codes: 0 ok, 1 error, 2 bad configuration or usage, "
        "3 enrollment pending, 4 enrollment refused.",
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
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"scire-client {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "enroll", "spool"),
        help="run (default): enroll if needed, run the jobs, exit; enroll: only enroll; "
        "spool: list the spool",
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
    )


def cmd_run(config: ClientConfig) -> int:
    try:
        return agent.run(config)
    except AgentBusy as exc:
        # Cron started us while the last run still works: that run does the job.
        log.info("%s; leaving the work to it", exc)
        return EXIT_OK


def cmd_enroll(config: ClientConfig) -> int:
    def show_request(key_fingerprint: str) -> None:
        # On stdout before the wait, so the operator can compare it while pending.
        print(f"enrollment request of {config.name}: key fingerprint {key_fingerprint}", flush=True)

    with lock.hold(config.lock_file):
        if enroll.ensure_enrolled(config, on_request=show_request):
            print(f"enrolled as {config.name}: {config.cert_file}")
        else:
            print(f"already enrolled as {config.name}: {config.cert_file}")
    return EXIT_OK


def cmd_spool(config: ClientConfig) -> int:
    if not config.spool_dir.exists():
        return EXIT_OK
    spool = Spool(config.spool_dir)
    rows = [
        (str(e.job_id), e.state, spool.cancel_reason(e.job_id) or "", e.name)
        for e in spool.entries()
    ]
    table = [("JOB", "STATE", "CANCELLED", "NAME"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        print(*cells, row[3], sep="  ")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "enroll": cmd_enroll, "spool": cmd_spool}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr
    )
    try:
        config = load_config(args)
        return COMMANDS[args.command](config)
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
