"""Timed work inside the daemon, on APScheduler: heartbeat, sweep, retention,
the summary of anonymous refusals, the batched write of the agents'
last-seen times, and the runs of schedules coming due.

Several daemons on one database each run all of them; the table "Timed work
on several daemons" in docs/ARCHITECTURE.md says why each is safe: the
repairs and the schedules' runs by conditional updates and skipped row locks
(a hung daemon must never stall them for the others), retention on one daemon
at a time under an advisory lock, heartbeat, refusal summary and last-seen
flush per daemon. A task that fails is logged and runs again at its next tick; while the
database is unreachable a failed tick is not logged (the store's outage
tracker logs the outage once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from scire_server import recovery
from scire_server.config import ServerConfig
from scire_server.exceptions import DatabaseUnreachable, ScireError
from scire_server.store import Store
from scire_server.work_due import WorkDue

log = logging.getLogger(__name__)


def _guarded(name: str, task: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            task()
        except DatabaseUnreachable:
            pass  # counted and logged once per outage by the store
        except ScireError as exc:
            log.warning("timed task %s: %s; retrying at the next tick", name, exc.message)
        except Exception:
            log.exception("timed task %s failed; retrying at the next tick", name)

    return run


def make_due_runs(store: Store, config: ServerConfig, work_due: WorkDue) -> set[str]:
    """Make the schedules' runs that are due, then tell ``work_due`` whose
    clients got work (after the runs' transactions have committed)."""
    clients = store.schedules.materialize(grace=config.schedule_misfire_grace)
    work_due.announce(clients)
    return clients


def one_daemon_at_a_time(store: Store, task: str, run: Callable[[], Any]) -> bool:
    """Run ``run`` unless another daemon runs ``task`` now (PostgreSQL advisory
    lock); whether it ran."""
    with store.servers.exclusive(task) as mine:
        if not mine:
            log.debug("timed task %s runs on another daemon now; skipping this tick", task)
            return False
        run()
        return True


def start(
    store: Store,
    config: ServerConfig,
    summarize_refusals: Callable[[], None],
    flush_last_seen: Callable[[], object] | None = None,
    work_due: WorkDue | None = None,
    on_sweep: Callable[[dict[str, int]], None] | None = None,
    check_idle_clients: Callable[[], object] | None = None,
) -> BackgroundScheduler:
    """Start the daemon's timed work; ``summarize_refusals`` is the API's
    (``RemoteMethods.summarize_refusals``), run every ``refusal_summary_interval``;
    ``flush_last_seen`` (``RemoteMethods.flush_last_seen``) every
    ``last_seen_flush_interval``; the sweep and each schedule tick announce on
    ``work_due`` the clients they gave work; ``on_sweep`` hears what each sweep
    repaired (the metrics); ``check_idle_clients`` (``RemoteMethods.check_idle_clients``)
    every ``poll_cache_check`` seconds when the poll cache is on."""
    due = work_due or WorkDue()

    def retention() -> None:
        recovery.retention(store, config)

    def sweep() -> None:
        counts = recovery.sweep(store, config, due)
        if on_sweep is not None:
            on_sweep(counts)

    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1}
    )
    scheduler.add_job(
        _guarded("heartbeat", lambda: recovery.heartbeat(store, config, due)),
        "interval",
        seconds=config.heartbeat_interval,
        id="heartbeat",
    )
    scheduler.add_job(
        _guarded("sweep", sweep),
        "interval",
        seconds=config.sweep_interval,
        id="sweep",
    )
    scheduler.add_job(
        _guarded("retention", lambda: one_daemon_at_a_time(store, "retention", retention)),
        "interval",
        seconds=config.retention_interval,
        id="retention",
    )
    scheduler.add_job(
        _guarded("refusal summary", summarize_refusals),
        "interval",
        seconds=config.refusal_summary_interval,
        id="refusal_summary",
    )
    if flush_last_seen is not None:
        scheduler.add_job(
            _guarded("last-seen flush", flush_last_seen),
            "interval",
            seconds=config.last_seen_flush_interval,
            id="last_seen_flush",
        )
    if check_idle_clients is not None and config.poll_cache_check > 0:
        scheduler.add_job(
            _guarded("poll cache check", check_idle_clients),
            "interval",
            seconds=config.poll_cache_check,
            id="poll_cache_check",
        )
    scheduler.add_job(
        _guarded("schedules", lambda: make_due_runs(store, config, due)),
        "interval",
        seconds=config.schedule_tick,
        id="schedules",
        # A tick that starts late still runs (the runs it makes are due all the same).
        misfire_grace_time=None,
    )
    scheduler.start()
    return scheduler
