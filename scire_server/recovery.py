"""What a daemon repairs, at start-up and then all the time.

Start-up runs, in order and before the listener opens: refuse a live
duplicate of this instance key; return expired leases and the leases this
instance held in its previous life; expire jobs past their expiry; record one
``recovery`` audit event with the counts. ``sweep`` runs the same repairs
(without the instance check) every few seconds while the daemon runs, and
first takes over the other daemons whose heartbeat went stale (marks them
``dead``, returns their leases, one ``takeover`` audit row each). Work
that a repair makes due again (a lease returned, a lost run requeued), and at
start-up every client's pending work, is announced on the work-due signal.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from scire_server.config import ServerConfig
from scire_server.store import SERVER, Store
from scire_server.work_due import WorkDue

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_up(store: Store, config: ServerConfig) -> dict[str, Any]:
    """Register this daemon and repair what its death (or anyone's) left behind.

    Raises ``InstanceConflict`` when another live daemon holds the instance key.
    """
    previous = store.servers.start(
        config.instance_key,
        socket.gethostname(),
        os.getpid(),
        config.public_url,
        config.instance_stale_after,
        is_alive=pid_alive,
    )
    leases = store.sweeps.return_leases(own_previous_life=True)
    expired = store.sweeps.expire()
    counts = {
        "previous_state": previous.get("previous_state") or "new",
        "leases_returned": leases["returned"],
        "undeliverable": leases["undeliverable"],
        "expired": expired,
    }
    detail = ", ".join(f"{k}={v}" for k, v in counts.items())
    store.audit.record(SERVER, "recovery", detail=detail)
    log.info("recovery of %s done: %s", config.instance_key, detail)
    return counts


def announce_due_work(store: Store, work_due: WorkDue) -> int:
    """At start-up, once the listener is open: announce every client with
    pending work it could claim now (its agent may have waited for a push
    while this daemon was down); returns how many."""
    names = store.sweeps.clients_with_due_work()
    if names:
        log.info("start-up: %d client(s) have work due; announcing it", len(names))
    work_due.announce(names)
    return len(names)


def sweep(store: Store, config: ServerConfig, work_due: WorkDue | None = None) -> dict[str, int]:
    """One pass of continuous recovery; safe to run on several daemons at once."""
    take_over(store, config, work_due)
    leases = store.sweeps.return_leases()
    expired = store.sweeps.expire()
    lost = store.sweeps.mark_lost(config.lost_after)
    if work_due is not None:
        work_due.announce(leases.due | lost.due)
    counts = leases | lost | {"expired": expired}
    if any(counts.values()):
        log.info("sweep: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def take_over(store: Store, config: ServerConfig, work_due: WorkDue | None = None) -> int:
    """Mark the other daemons whose heartbeat is older than
    ``instance_stale_after`` dead and return their leases; safe on several
    daemons at once (only one wins each). Returns how many were taken over."""
    takeovers = store.sweeps.take_over(config.instance_stale_after)
    for takeover in takeovers:
        log.warning("takeover: %s", takeover.detail)
        if work_due is not None:
            work_due.announce(takeover.leases.due)
    return len(takeovers)


def heartbeat(store: Store, config: ServerConfig, work_due: WorkDue | None = None) -> bool:
    """Heartbeat this daemon's row. When the row no longer says this process
    runs (it hung past ``instance_stale_after`` and another daemon took over
    its leases), say so loudly and register again: the leases it handed out
    are pending again (or re-sent), and an agent's late acknowledgement of one
    is accepted only while its delivery is still the current one."""
    if store.servers.heartbeat():
        return True
    state = store.servers.state()
    log.error(
        "this daemon's row says %r: another daemon took over after %s s without a heartbeat "
        "(was this process stopped or hung?); registering again",
        state,
        config.instance_stale_after,
    )
    start_up(store, config)
    if work_due is not None:
        announce_due_work(store, work_due)
    return False


def retention(store: Store, config: ServerConfig) -> dict[str, int]:
    """Purge old output and audit rows (``retention_days``); with
    ``job_retention_days`` also remove the jobs finished longer ago than that,
    with their assignments and audit rows (``jobs``: how many)."""
    counts = store.sweeps.purge(config.retention_days)
    log.info(
        "retention: purged the output of %d assignment(s) and %d audit row(s) older than %d day(s)",
        counts["outputs"],
        counts["events"],
        config.retention_days,
    )
    if config.job_retention_days > 0:
        removed = store.sweeps.purge_jobs(config.job_retention_days)
        log.info(
            "retention: removed %d finished jobs older than %d days "
            "(%d assignments, %d audit rows, %d transactions)",
            removed["jobs"],
            config.job_retention_days,
            removed["assignments"],
            removed["events"],
            removed["batches"],
        )
        counts = counts | {"jobs": removed["jobs"]}
    return counts
