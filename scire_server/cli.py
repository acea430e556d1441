"""``scire-server``: run one daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from scire_schema import tls
from scire_schema.errors import SchemaError
from scire_schema.exitcodes import ExitCode, epilog
from scire_server import __version__, migrations, recovery, store, timed
from scire_server.api import RemoteMethods
from scire_server.config import ServerConfig
from scire_server.exceptions import InstanceConflict, ScireError
from scire_server.rpc import ScireRPCServer, listener_limits
from scire_server.work_due import WorkDue

log = logging.getLogger("scire_server")

LOG_FORMAT = "%(asctime)s scire-server[%(process)d] %(levelname)s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scire-server",
        description="Run a Scire server daemon until SIGTERM or SIGINT.",
        epilog="examples:\n"
        "  # the state directory made by 'scire-admin init', default port 8443\n"
        "  scire-server --state-dir /var/lib/scire\n"
        "  # one of several daemons sharing a PostgreSQL database\n"
        "  scire-server -c /etc/scire/server.ini --database-url "
        "postgresql+psycopg://scire@db/scire\n\n" + epilog("scire-server"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", type=Path, help="INI file with a [server] section")
    p.add_argument(
        "--state-dir", type=Path, help="directory with the CA, the server key and SQLite"
    )
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the state dir)")
    p.add_argument("--listen-host")
    p.add_argument("--listen-port", type=int)
    p.add_argument("--public-url", help="URL agents and admins use to reach this daemon")
    p.add_argument("--instance-key", help="unique name of this daemon (default host:port)")
    p.add_argument("--max-threads", type=int)
    p.add_argument("--ack-timeout", type=int, help="seconds a sent job waits for its ack")
    p.add_argument("--lost-after", type=int, help="seconds of agent silence before running is lost")
    p.add_argument("--sweep-interval", type=int)
    p.add_argument("--log-level")
    p.add_argument("--version", action="version", version=f"scire-server {__version__}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig.load(
        args.config,
        state_dir=args.state_dir,
        database_url=args.database_url,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        public_url=args.public_url,
        instance_key=args.instance_key,
        max_threads=args.max_threads,
        ack_timeout=args.ack_timeout,
        lost_after=args.lost_after,
        sweep_interval=args.sweep_interval,
        log_level=args.log_level,
    )


def serve(config: ServerConfig) -> int:
    if not config.ca_key_file.exists() or not config.cert_file.exists():
        log.error(
            "no CA or server certificate in %s: run 'scire-admin init' first", config.state_dir
        )
        return ExitCode.USAGE
    migrations.upgrade(config.database_url)
    db = store.Store(store.make_engine(config.database_url), config.instance_key)
    try:
        recovery.start_up(db, config)
    except InstanceConflict as exc:
        log.error("refusing to start: %s", exc.message)
        db.close()
        return ExitCode.INSTANCE_CONFLICT
    context = tls.server_context(config.cert_file, config.key_file, config.ca_cert_file)
    methods = RemoteMethods(config, db)
    server = ScireRPCServer(
        (config.listen_host, config.listen_port),
        context,
        methods,
        listener_limits(config),
    )
    try:
        server.start()
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s", config.listen_host, config.listen_port, exc.strerror
        )
        db.servers.stop()
        db.close()
        return 1
    work_due = WorkDue()
    scheduler = timed.start(db, config, methods.summarize_refusals, work_due)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.address
    log.info(
        "scire-server %s (instance %s) listening on https://%s:%s/ with %d threads",
        __version__,
        config.instance_key,
        host,
        port,
        config.max_threads,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        clean = server.drain(config.shutdown_grace)
        scheduler.shutdown(wait=True)
        methods.summarize_refusals()  # the last interval's, before the store closes
        db.servers.stop()
        db.close()
        log.info("stopped %s", "cleanly" if clean else "after cutting off in-flight calls")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
    except ScireError as exc:
        print(f"scire-server: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return serve(config)
    except (ScireError, SchemaError) as exc:  # SchemaError: the CA's own files are damaged
        log.error("%s", exc.message)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
