"""Timed work inside the daemon, on APScheduler: heartbeat, sweep, retention,
and the summary of anonymous refusals.

Each task is safe to run on several daemons at once (conditional updates),
and a task that fails is logged and runs again at its next tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from scire_server import recovery
from scire_server.config import ServerConfig
from scire_server.exceptions import ScireError
from scire_server.store import Store

log = logging.getLogger(__name__)


def _guarded(name: str, task: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            task()
        except ScireError as exc:
            log.warning("timed task %s: %s; retrying at the next tick", name, exc.message)
        except Exception:
            log.exception("timed task %s failed; retrying at the next tick", name)

    return run


def start(
    store: Store,
    config: ServerConfig,
    summarize_refusals: Callable[[], None],
    on_sweep: Callable[[dict[str, int]], None] | None = None,
) -> BackgroundScheduler:
    """Start the daemon's timed work; ``summarize_refusals`` is the API's
    (``RemoteMethods.summarize_refusals``), run every ``refusal_summary_interval``;
    ``on_sweep`` hears what each sweep repaired (the metrics)."""

    def sweep() -> None:
        counts = recovery.sweep(store, config)
        if on_sweep is not None:
            on_sweep(counts)

    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1}
    )
    scheduler.add_job(
        _guarded("heartbeat", store.servers.heartbeat),
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
        _guarded("retention", lambda: recovery.retention(store, config)),
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
    scheduler.start()
    return scheduler
