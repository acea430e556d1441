"""Daemon mode: ``scire-client daemon`` polls on its own and runs until SIGTERM.

The daemon is the normal-mode ``Agent`` in a loop: the same spool, recovery,
poll handling, reconciliation and reports, with these differences:

* it polls every ``poll_interval`` seconds (the server's suggestion, within
  ``POLL_INTERVAL_MIN``..``POLL_INTERVAL_MAX``, replaces the configured value),
  each wait scaled by a random factor in ``1 ± poll_jitter`` and the first one
  a random part of ``poll_jitter × poll_interval``, so a fleet restarted at once
  does not poll in lockstep; while jobs run it polls at least every
  ``heartbeat_interval``;
* a ``poll_now`` hint (``wakeup.py``) sets the wake flag, and the loop polls at
  once; hints that come while a poll runs, or within ``HINT_GAP`` of the last
  hinted poll, make one more poll at most;
* it runs up to ``max_parallel`` spooled jobs at once, highest priority first,
  then the oldest (``Spool.runnable``), and checks them without blocking; a
  thread per job waits for its process and wakes the loop when it ends, so the
  report goes out at once; the jobs it starts right after a poll are
  acknowledged as started (no separate ``running`` report);
* a poll no server answered is tried again after a jittered delay doubling
  from ``POLL_RETRY_FIRST`` to ``POLL_RETRY_MAX`` (or ``poll_interval``, if
  less), so a restarted server is polled again within seconds; undelivered
  reports likewise from ``REPORT_BACKOFF_START`` to ``REPORT_RETRY_MAX``, for
  as long as it lives; a pause a server asks for ("retry after N s") is waited
  out instead, stretched by up to a quarter, and logged as no failure;
* on SIGTERM or SIGINT it stops polling and starting jobs, gives running jobs
  ``shutdown_grace`` seconds, then stops them (SIGTERM, SIGKILL after
  ``kill_grace``: only their own process groups) and reports them failed with
  ``SHUTDOWN_REASON``, delivers what it can and exits 0.

Jobs started by an earlier agent process are re-attached at start (``recover``):
they count against ``max_parallel`` and are reported when they end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from scire_client import agent, enroll, lock, renewal, runner
from scire_client.agent import REPORT_BACKOFF_START, Agent
from scire_client.config import POLL_INTERVAL_MAX, POLL_INTERVAL_MIN, ClientConfig
from scire_client.exceptions import ConfigError, RetryLater, ServerFault, TransportError
from scire_client.spool import Spool
from scire_client.transport import ServerTransport
from scire_client.wakeup import PollNowListener
from scire_schema import failover
from scire_schema.files import write_atomic
from scire_schema.protocol import AgentMode, utc_now

log = logging.getLogger(__name__)

HINT_GAP = 0.1  # seconds between two polls that poll_now hints asked for: at most 10 a second
REPORT_RETRY_MAX = 60.0  # seconds; the longest wait between tries of undelivered reports
POLL_RETRY_FIRST = 1.0  # seconds before the first poll after one no server answered
POLL_RETRY_MAX = 60.0  # seconds; the retries double up to this (or poll_interval, if less)
SIGNAL_CHECK = 0.5  # seconds; the longest the loop sleeps without looking for a stop request
SHUTDOWN_REASON = "killed: the agent stopped and its shutdown_grace of {grace:g} s ran out"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run(config: ClientConfig) -> int:
    """``scire-client daemon``: enroll if needed, recover the spool, serve until SIGTERM."""
    setup = agent.job_setup(config)
    with lock.hold(config.lock_file):
        enroll.ensure_enrolled(config)
        renewal.finish_interrupted(config)
        transport = ServerTransport(config)
        try:
            renewal.resume(config, transport)
            with pid_file(config.pid_file):
                return Daemon(config, transport, Spool(config.spool_dir), setup).serve()
        finally:
            transport.close()


@contextlib.contextmanager
def pid_file(path: Path | None) -> Iterator[None]:
    """Write our pid to ``path`` for the daemon's life; remove it after, if still ours."""
    if path is None:
        yield
        return
    pid = f"{os.getpid()}\n"
    write_atomic(path, pid.encode(), 0o644)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == pid:
                path.unlink()


class Daemon(Agent):
    def __init__(
        self,
        config: ClientConfig,
        transport: ServerTransport,
        spool: Spool,
        setup: runner.JobSetup,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, transport, spool, setup, clock=clock)
        self.presence["mode"] = AgentMode.DAEMON.value
        #: Set by poll_now hints (``hint``).
        self.wake = threading.Event()
        #: What the loop sleeps on: set by a hint, and by the end of a job's process
        #: (a thread waits for each), so a finished job is reported at once.
        self._rouse = threading.Event()
        self.polls = 0  #: since start, for the log
        self._rng = rng or random.Random()
        self._stopping = False
        self._running: dict[int, runner.JobRun] = {}
        self._interval = config.poll_interval
        self._next_poll = 0.0
        self._last_hinted_poll = float("-inf")
        self._poll_backoff = failover.Backoff(
            POLL_RETRY_FIRST,
            max(POLL_RETRY_FIRST, min(POLL_RETRY_MAX, config.poll_interval)),
            self._rng,
        )
        self._report_backoff = failover.Backoff(REPORT_BACKOFF_START, REPORT_RETRY_MAX, self._rng)
        self._next_report_try = 0.0
        #: The last poll came back full: the server may hold more for us.
        self._backlog = False
        self._listener: PollNowListener | None = None
        self._next_renewal_check = 0.0  # at start, then daily

    def hint(self) -> None:
        """A ``poll_now`` hint came (the listener's thread calls this)."""
        self.wake.set()
        self._rouse.set()

    def stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        """Ask the loop to stop (a signal handler: it only sets a flag)."""
        self._stopping = True

    def serve(self) -> int:
        previous = {sig: signal.signal(sig, self.stop) for sig in STOP_SIGNALS}
        listener: PollNowListener | None = None
        try:
            for run in self.recover():
                self._running[run.job_id] = run
            if self.config.listen:
                listener = PollNowListener(self.config, self.hint)
                listener.start()
                self._listener = listener
                self.presence["callback"] = listener.callback
            log.info(
                "%s: daemon started: poll every %g s, up to %d job(s) at once, %s",
                self.config.name,
                self._interval,
                self.config.max_parallel,
                f"poll_now at {listener.callback}" if listener else "no poll_now listener",
            )
            first = self._rng.uniform(0, self.config.poll_jitter * self._interval)
            self._next_poll = self._clock() + first
            while not self._stopping:
                self._step()
            if listener is not None:
                listener.stop()
                listener = None
            return self._shut_down()
        finally:
            if listener is not None:
                listener.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # The loop.

    def _step(self) -> None:
        # Cleared before the work, not after the sleep: what happens during this
        # step (a job ending) makes the next sleep end at once.
        self._rouse.clear()
        if self._clock() >= self._next_renewal_check:
            self._renew_if_due()
        now = self._clock()
        hinted = self.wake.is_set() and now - self._last_hinted_poll >= HINT_GAP
        heartbeat = bool(self._running) and (
            now - self._last_contact >= self.config.heartbeat_interval
        )
        # A full batch means more may wait on the server: fetch it once there is
        # room, rather than at the next interval (a burst of 50 jobs is 5 polls).
        backlog = (
            self._backlog
            and len(self._running) < self.config.max_parallel
            and not self.spool.runnable()
        )
        if hinted or heartbeat or backlog or now >= self._next_poll:
            if hinted:
                self.wake.clear()
                self._last_hinted_poll = now
            why = "poll_now" if hinted else "heartbeat" if heartbeat else "interval"
            self._poll_once("backlog" if backlog and not hinted else why)
        self._check_runs()
        # Reports first: starting a job takes a while (its wrapper process), and
        # the result of the one that just ended should not wait for that.
        self._try_reports()
        self._start_runnable()
        self._wait()

    def _renew_if_due(self) -> None:
        """Renew the certificate when it is within ``renew_before`` days of expiry;
        checked again a day later, or an hour after a failed renewal."""
        self._next_renewal_check = self._clock() + renewal.DAY
        try:
            if not renewal.due(self.config, utc_now()):
                return
            log.info(
                "%s: certificate expires %s UTC, within renew_before (%g days): renewing",
                self.config.name,
                f"{renewal.expiry(self.config):%Y-%m-%d %H:%M}",
                self.config.renew_before,
            )
            renewal.renew(self.config, self.transport)
        except (TransportError, ServerFault, ConfigError, OSError) as exc:
            self._next_renewal_check = self._clock() + renewal.RETRY_AFTER_FAILURE
            log.error(
                "%s: certificate renewal failed: %s; trying again in %g s",
                self.config.name,
                exc,
                renewal.RETRY_AFTER_FAILURE,
            )
            return
        if self._listener is not None:
            self._listener.reload_certificate()

    def _poll_once(self, why: str) -> None:
        self.polls += 1
        try:
            answer = self._poll(self.config.poll_batch, woken=why == "poll_now")
            added = self._handle(answer)
        except (TransportError, ServerFault) as exc:
            # Contact failed too: a heartbeat is not due again before the next try.
            self._last_contact = self._clock()
            self._backlog = False
            if isinstance(exc, RetryLater):
                delay = failover.stretch(exc.seconds, self._rng)
                log.info("poll: the server asks for a pause; next poll in %.1f s", delay)
            else:
                # Soon, then less and less often: a server that restarted is polled
                # again within seconds, not after a whole poll_interval (a poll_now
                # hint that came while it was down is not lost), and a fleet whose
                # server is gone does not come back in lock-step.
                first = not self._poll_backoff.active
                delay = self._poll_backoff.next()
                log.log(
                    logging.WARNING if first else logging.INFO,
                    "poll failed: %s; next try in %.1f s",
                    exc,
                    delay,
                )
            self._next_poll = self._clock() + delay
            return
        self._poll_backoff.reset()
        self._backlog = len(answer.jobs) >= self.config.poll_batch
        if answer.poll_interval > 0:
            suggested = min(max(float(answer.poll_interval), POLL_INTERVAL_MIN), POLL_INTERVAL_MAX)
            if suggested != self._interval:
                log.info("poll interval %g s, as the server suggests", suggested)
                self._interval = suggested
        self._next_poll = self._clock() + self._jittered(self._interval)
        log.debug(
            "poll %d (%s): %d new job(s), next poll in %.1f s",
            self.polls,
            why,
            added,
            self._next_poll - self._clock(),
        )
        for job_id, run in self._running.items():
            if self.spool.cancel_reason(job_id) is not None:
                run.stop("cancelled", runner.CANCELLED_REASON)

    def _jittered(self, interval: float) -> float:
        jitter = self.config.poll_jitter
        return interval * self._rng.uniform(1 - jitter, 1 + jitter)

    def _check_runs(self) -> None:
        for job_id, run in list(self._running.items()):
            report = run.check()
            if report is not None:
                del self._running[job_id]
                self._finished(run, report)
                self._next_report_try = 0.0  # a new report goes out at once
            elif not self._stopping:
                self._send_live_output(run)

    def _starting_now(self, new_ids: list[int]) -> list[int]:
        """Of the jobs a poll just brought, those ``_start_runnable`` starts in
        this step: the first runnable ones, as many as there are free slots."""
        if self._stopping:
            return []
        free = max(0, self.config.max_parallel - len(self._running))
        return [e.job_id for e in self.spool.runnable()[:free] if e.job_id in new_ids]

    def _start_runnable(self) -> None:
        if self._stopping:
            return
        for entry in self.spool.runnable():
            if len(self._running) >= self.config.max_parallel or self._stopping:
                return
            run = self._start(entry)
            if run is not None:
                self._running[run.job_id] = run
                run.on_end(self._rouse.set)

    def _try_reports(self) -> None:
        if self._clock() < self._next_report_try:
            return
        pending = self.spool.pending_reports()
        if not pending:
            return
        try:
            if self._send_reports(pending):
                self._report_backoff.reset()
                return
        except RetryLater as exc:
            delay = failover.stretch(exc.seconds, self._rng)
            self._next_report_try = self._clock() + delay
            log.info("reports: the server asks for a pause; next try in %.1f s", delay)
            return
        delay = self._report_backoff.next()
        self._next_report_try = self._clock() + delay
        log.warning(
            "%d report(s) undelivered; retrying in %.1f s",
            len(self.spool.pending_reports()),
            delay,
        )

    def _wait(self) -> None:
        now = self._clock()
        until = self._next_poll
        if self._running:
            until = min(until, now + runner.WAIT_STEP)
        if self.spool.pending_reports():
            until = min(until, self._next_report_try)
        timeout = min(max(0.0, until - now), SIGNAL_CHECK)
        if self.wake.is_set():
            # A hint within HINT_GAP of the last hinted poll: it waits for the gap's end.
            time.sleep(min(timeout, max(0.0, self._last_hinted_poll + HINT_GAP - now)))
        else:
            self._rouse.wait(timeout)

    # Stopping.

    def _shut_down(self) -> int:
        grace = self.config.shutdown_grace
        if self._running:
            log.info(
                "stopping: %d running job(s) get %g s (shutdown_grace) to finish",
                len(self._running),
                grace,
            )
        else:
            log.info("stopping")
        deadline = self._clock() + grace
        while self._running and self._clock() < deadline:
            self._check_runs()
            self._try_reports()
            if self._running:
                time.sleep(min(runner.WAIT_STEP, max(0.0, deadline - self._clock())))
        for run in self._running.values():
            log.warning(
                "job %s (%s): still running after %g s: stopping it",
                run.job_id,
                run.doc.name,
                grace,
            )
            run.stop("failed", SHUTDOWN_REASON.format(grace=grace))
        # SIGKILL follows kill_grace after SIGTERM; a group that is not provably the
        # job's is never signalled, and such a run is left for the next start.
        give_up = self._clock() + self.config.kill_grace + 5.0
        while self._running and self._clock() < give_up:
            self._check_runs()
            if self._running:
                time.sleep(runner.WAIT_STEP)
        for run in self._running.values():
            log.error(
                "job %s (%s): did not end; the next start re-attaches to it",
                run.job_id,
                run.doc.name,
            )
        try:
            delivered = self.deliver_reports()
        except RetryLater:
            delivered = False
        log.info("stopped%s", "" if delivered else "; undelivered reports wait in the spool")
        return 0
