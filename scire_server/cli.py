"""``scire-server``: run one daemon until SIGTERM or SIGINT, or check
(``scire-server check``) that one could start."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from scire_schema import certs, logformat, tls
from scire_schema.errors import SchemaError
from scire_schema.exitcodes import ExitCode, epilog
from scire_server import __version__, migrations, monitoring, preflight, recovery, store, timed
from scire_server.api import RemoteMethods
from scire_server.config import ServerConfig
from scire_server.exceptions import InstanceConflict, ScireError
from scire_server.push import Pusher
from scire_server.relay import Relay
from scire_server.rpc import ScireRPCServer, listener_limits
from scire_server.work_due import WorkDue

log = logging.getLogger("scire_server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scire-server",
        description="Run a Scire server daemon until SIGTERM or SIGINT.",
        epilog="examples:\n"
        "  # the state directory made by 'scire-admin init', default port 8443\n"
        "  scire-server --state-dir /var/lib/scire\n"
        "  # one of several daemons sharing a PostgreSQL database\n"
        "  scire-server -c /etc/scire/server.ini --database-url "
        "postgresql+psycopg://scire@db/scire\n"
        "  # before the first start: configuration, state dir, certificates, database, port\n"
        "  scire-server -c /etc/scire/server.ini check\n\n"
        + epilog("scire-server")
        + "\n  check exits 1 when any check fails.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", type=Path, help="INI file with a [server] section")
    p.add_argument(
        "--state-dir", type=Path, help="directory with the CA, the server key and SQLite"
    )
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the state dir)")
    p.add_argument(
        "--database-wait",
        type=float,
        metavar="SECONDS",
        help="how long start-up retries a database that does not answer (default 300)",
    )
    p.add_argument("--listen-host")
    p.add_argument("--listen-port", type=int)
    p.add_argument("--public-url", help="URL agents and admins use to reach this daemon")
    p.add_argument("--instance-key", help="unique name of this daemon (default host:port)")
    p.add_argument("--max-threads", type=int)
    p.add_argument("--ack-timeout", type=int, help="seconds a sent job waits for its ack")
    p.add_argument("--lost-after", type=int, help="seconds of agent silence before running is lost")
    p.add_argument("--sweep-interval", type=int)
    p.add_argument(
        "--poll-cache-check",
        type=int,
        metavar="SECONDS",
        help="seconds between the empty-poll cache's safety checks (default 30; 0: no cache)",
    )
    p.add_argument(
        "--job-retention-days",
        type=int,
        metavar="DAYS",
        help="retention also deletes jobs whose every host finished more than DAYS days ago, "
        "with their results and audit rows (default 0: keep jobs)",
    )
    p.add_argument("--heartbeat-interval", type=int, help="seconds between heartbeats (default 5)")
    p.add_argument(
        "--instance-stale-after",
        type=int,
        help="seconds without a heartbeat before another daemon takes this one over (default 30)",
    )
    p.add_argument(
        "--push",
        choices=["on", "off"],
        help="send poll_now to daemon-mode agents when work becomes due (default on)",
    )
    p.add_argument("--push-workers", type=int, help="pushes in flight at once (default 8)")
    p.add_argument(
        "--push-timeout", type=float, help="seconds one push may take in all (default 2)"
    )
    p.add_argument(
        "--offline-after-polls",
        type=int,
        help="poll intervals of silence before 'client list' shows a client offline (default 3)",
    )
    p.add_argument("--log-level")
    p.add_argument("--log-format", choices=logformat.FORMATS, help="text (default) or json lines")
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve /metrics and /healthz over plain HTTP here (e.g. 127.0.0.1:9464)",
    )
    p.add_argument("--version", action="version", version=f"scire-server {__version__}")
    p.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=("serve", "check"),
        help="serve (default): run the daemon; check: test the configuration, state "
        "directory, certificates, database, peers and port, one line each, and exit",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig.load(
        args.config,
        state_dir=args.state_dir,
        database_url=args.database_url,
        database_wait=args.database_wait,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        public_url=args.public_url,
        instance_key=args.instance_key,
        max_threads=args.max_threads,
        ack_timeout=args.ack_timeout,
        lost_after=args.lost_after,
        sweep_interval=args.sweep_interval,
        poll_cache_check=args.poll_cache_check,
        heartbeat_interval=args.heartbeat_interval,
        job_retention_days=args.job_retention_days,
        instance_stale_after=args.instance_stale_after,
        push=args.push,
        push_workers=args.push_workers,
        push_timeout=args.push_timeout,
        offline_after_polls=args.offline_after_polls,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_listen=args.metrics_listen,
    )


def wait_for_database(config: ServerConfig) -> None:
    """Return once the database answers; ``Unavailable`` after ``database_wait``
    seconds of trying (one line per attempt)."""
    where = store.redacted(config.database_url)

    def on_retry(why: str, pause: float) -> None:
        log.warning("waiting for the database %s: %s; next try in %.0f s", where, why, pause)

    store.wait_until_reachable(config.database_url, config.database_wait, on_retry)


def serve(config: ServerConfig) -> int:
    problem = preflight.state_dir_problem(config)
    if problem is not None:
        log.error("cannot start: %s", problem)
        missing = not config.state_dir.is_dir() or not config.ca_key_file.exists()
        return ExitCode.USAGE if missing else ExitCode.ERROR
    sqlite_file = store.sqlite_path(config.database_url)
    if sqlite_file is None:
        wait_for_database(config)
        return _serve(config)
    # Held until this process ends: a second daemon on the file is refused.
    sqlite_lock = store.SqliteDaemonLock(sqlite_file)
    try:
        sqlite_lock.acquire(config.instance_key)
    except InstanceConflict as exc:
        log.error("refusing to start: %s", exc.message)
        return ExitCode.INSTANCE_CONFLICT
    try:
        return _serve(config)
    finally:
        sqlite_lock.release()


def _serve(config: ServerConfig) -> int:
    migrations.upgrade(config.database_url)
    db = store.Store(
        store.make_engine(config.database_url, store.daemon_pool_size(config.max_threads)),
        config.instance_key,
    )
    metrics = monitoring.ServerMetrics(config.instance_key)
    for which, path in (("ca", config.ca_cert_file), ("server", config.cert_file)):
        metrics.certificate(which, certs.load_cert(path.read_bytes()).not_valid_after_utc)
    try:
        metrics.repaired("start_up", recovery.start_up(db, config))
    except InstanceConflict as exc:
        log.error("refusing to start: %s", exc.message)
        db.close()
        return ExitCode.INSTANCE_CONFLICT
    context = tls.server_context(config.cert_file, config.key_file, config.ca_cert_file)
    # One "work became due for these clients" signal per daemon: submissions,
    # the sweep, schedule ticks and start-up announce on it; the pusher listens.
    work_due = WorkDue()
    pusher: Pusher | None = None
    methods = RemoteMethods(config, db, work_due, observer=metrics)
    if config.push:
        pusher = Pusher.from_config(config, db, methods.last_seen)
        methods.on_presence_change = pusher.forget
        # Only this daemon's own announcements: the daemon where work changed pushes.
        work_due.subscribe(pusher, relayed=False)
    relay: Relay | None = None
    if db.signals.available:
        # Announcements cross to the other daemons on the database, and theirs to us.
        relay = Relay(
            db,
            work_due,
            config.instance_key,
            on_identities_changed=methods.known_callers.forget_all,
        )
        # Callers are remembered only while no other daemon's change can be missed.
        methods.known_callers.usable = lambda: relay is not None and relay.listening
        methods.on_identities_changed = relay.identities_changed
        if not relay.start():
            log.warning("relay: not listening yet; it keeps trying")
    health = monitoring.HealthCheck(db)
    app = monitoring.MonitoringApp(health, metrics, methods.identify)
    server = ScireRPCServer(
        (config.listen_host, config.listen_port),
        context,
        methods,
        listener_limits(config),
        fallback=app,
        on_call=metrics.call,
    )
    health.draining = lambda: server.listener.draining
    metrics.register(monitoring.StoreCounts(db, config.metrics_refresh, config.lost_after))
    metrics.add_listener(server.stats)
    if config.poll_cache_check > 0:
        metrics.add_poll_cache(methods.idle_clients.snapshot)
    if pusher is not None:
        metrics.add_pusher(pusher.counters.snapshot)
    plain: monitoring.PlainHTTPEndpoint | None = None
    try:
        server.start()
        if config.metrics_address is not None:
            plain = monitoring.PlainHTTPEndpoint(config.metrics_address, app)
            plain.start()
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s",
            config.listen_host,
            config.listen_port,
            exc.strerror or exc,
        )
        if pusher is not None:
            pusher.close()
        if relay is not None:
            relay.close()
        server.drain(0)
        db.servers.stop()
        db.close()
        return ExitCode.ERROR
    scheduler = timed.start(
        db,
        config,
        methods.summarize_refusals,
        methods.flush_last_seen,
        work_due,
        on_sweep=lambda counts: metrics.repaired("sweep", counts),
        check_idle_clients=methods.check_idle_clients,
    )
    try:
        recovery.announce_due_work(db, work_due)
    except ScireError as exc:
        log.warning(
            "start-up: pending work not announced (the polls will find it): %s", exc.message
        )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.address
    log.info(
        "scire-server %s (instance %s) listening on https://%s:%s/ with %d threads, "
        "database %s, push %s",
        __version__,
        config.instance_key,
        host,
        port,
        config.max_threads,
        store.redacted(config.database_url),
        f"on ({config.push_workers} workers, {config.push_timeout:g} s)" if pusher else "off",
    )
    if plain is not None:
        log.info("metrics and health on http://%s:%s/metrics", *plain.address)
    for advice in config.advice():
        log.warning("%s", advice)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        clean = server.drain(config.shutdown_grace)
        if plain is not None:
            plain.stop()
        scheduler.shutdown(wait=True)
        if pusher is not None:
            work_due.unsubscribe(pusher)
            pusher.close()  # queued pushes dropped; those in flight end within push_timeout
        if relay is not None:
            relay.close()
        methods.summarize_refusals()  # the last interval's, before the store closes
        try:
            methods.flush_last_seen()
        except ScireError as exc:
            log.warning("the agents' last-seen times were not written: %s", exc.message)
        db.servers.stop()
        db.close()
        log.info("stopped %s", "cleanly" if clean else "after cutting off in-flight calls")
    return 0


def check(args: argparse.Namespace) -> int:
    """``scire-server check``: one line per check on stdout; 1 when any failed."""
    try:
        config = load_config(args)
    except ScireError as exc:
        print(preflight.Finding("config", False, exc.message).line())
        return ExitCode.ERROR
    source = f"{args.config}" if args.config else "no file; defaults and flags"
    findings = preflight.run(config, f"{source}; state_dir {config.state_dir}")
    for finding in findings:
        print(finding.line())
    return ExitCode.OK if all(f.ok for f in findings) else ExitCode.ERROR


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "check":
        return check(args)
    try:
        config = load_config(args)
        logformat.configure(
            "scire-server",
            config.log_level,
            config.log_format,
            defaults=logformat.event(server=config.instance_key),
        )
    except ScireError as exc:
        print(f"scire-server: {exc.message}", file=sys.stderr)
        return ExitCode.USAGE
    except ValueError as exc:  # the log level
        print(f"scire-server: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return serve(config)
    except (ScireError, SchemaError) as exc:  # SchemaError: the CA's own files are damaged
        log.error("cannot start: %s", exc.message)
        return ExitCode.ERROR
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        log.error("cannot start: %s%s", exc.strerror or exc, where)
        return ExitCode.ERROR


if __name__ == "__main__":
    sys.exit(main())
