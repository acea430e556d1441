"""Normal mode: poll until no work is left, run the jobs, report, exit (for cron).

The agent decides what becomes of each job (the spool stores, the runner runs
and kills, the transport talks), and every status report it sends on its own
account is built by ``status_report``; the runner builds the one of a run.

A run starts with ``recover``: what a dead agent left is put in order, and
the jobs it started whose end is known or still to come are waited for and
reported with their real result (their wrapper recorded it, see ``runner``).

One pass of the loop:

1. deliver every pending report (they survive crashes in the spool);
2. poll, naming the jobs held and running; spool each job, then acknowledge
   the batch -- duplicates too, so the server's lease is satisfied; the job it
   starts right after is acknowledged as started (no separate running report);
3. apply the poll's reconcile list (cancelled, expired, unknown);
4. run the runnable jobs one by one, in spool order, with heartbeats
   (``poll`` with limit 0) every ``heartbeat_interval`` while each runs.

The run ends with 0 once a poll brings nothing new, nothing is runnable and
every report is delivered (several per ``agent.report_many`` call); with 1
when reports stay undelivered after
``report_retry_for`` seconds (they wait on disk for the next run).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from scire_client import __version__, enroll, lock, renewal, runner
from scire_client.config import ClientConfig
from scire_client.exceptions import (
    ConfigError,
    RetryLater,
    ServerFault,
    SpoolError,
    TransportError,
)
from scire_client.spool import RECEIVED, STARTED, Entry, Spool
from scire_client.transport import PollAnswer, Reconcile, ReportAnswer, ServerTransport
from scire_schema import documents, failover, logformat
from scire_schema.documents import JobDocument, StatusReport
from scire_schema.protocol import (
    REPORTS_PER_CALL_MAX,
    WOKEN,
    AgentMode,
    ReconcileAction,
    ReportedState,
    utc_now,
)

log = logging.getLogger(__name__)

REPORT_BACKOFF_START = 0.5  # seconds before the first retry of an undelivered report
REPORT_BACKOFF_MAX = 10.0  # seconds; the delay doubles up to this
#: A normal-mode run waits out a server's "retry after" up to this long; a longer
#: pause ends the run with exit 0 (nothing is wrong), the next run tries again.
SHORT_PAUSE = 10.0
#: XML per ``agent.report_many`` call: well under the listener's body cap (32 MiB)
#: even with a few reports carrying outputs of the largest limit.
REPORT_CALL_BYTES = 8 * 1024 * 1024
EXPIRED_REASON = "expired before it started"
UNKNOWN_REASON = "unknown to the server"
REASON_AGENT_RESTARTED = runner.AGENT_RESTARTED_REASON
RECOVERED_OUTPUT_LIMIT = 64 * 1024  # bytes, when the job file cannot tell its own limit


def run(config: ClientConfig) -> int:
    """``scire-client run``: enroll if needed, recover the spool, work until done."""
    setup = job_setup(config)
    with lock.hold(config.lock_file):
        enroll.ensure_enrolled(config)
        renewal.finish_interrupted(config)
        transport = ServerTransport(config)
        try:
            renewal.resume(config, transport)
            return Agent(config, transport, Spool(config.spool_dir), setup).run()
        finally:
            transport.close()


def job_setup(config: ClientConfig) -> runner.JobSetup:
    """How this agent runs jobs (``run_as``, ``work_root``, extra variables), checked
    at start-up: a user that does not exist, or one a non-root agent cannot become,
    is a ``ConfigError``."""
    try:
        setup = runner.JobSetup(
            user=runner.JobUser.resolve(config.run_as),
            work_root=config.work_path,
            extra_environment=config.extra_environment(os.environ),
        )
        runner.prepare_work_root(setup)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise ConfigError(f"work_root {config.work_path}: {exc.strerror}") from exc
    if setup.user.switch:
        log.debug("jobs run as %s (uid %s)", setup.user.name, setup.user.uid)
    return setup


def status_report(
    entry: Entry,
    state: ReportedState,
    *,
    reason: str | None = None,
    started: dt.datetime | None = None,
    output: str | None = None,
    truncated: bool = False,
) -> StatusReport:
    """A report the agent makes itself (the runner makes the one of a run it saw
    end). It names the entry's current delivery, which may be newer than the
    job file's; a final state is stamped finished now."""
    return StatusReport(
        job_id=entry.job_id,
        delivery_id=entry.delivery_id,
        state=state.value,
        started=started,
        finished=None if state == ReportedState.RUNNING else utc_now(),
        reason=reason,
        output=output,
        truncated=truncated,
    )


def recover(
    spool: Spool,
    kill_grace: float,
    work_root: Path | None = None,
    *,
    attach: Callable[[runner.JobRun], None] | None = None,
) -> list[int]:
    """Finish what a dead agent left; returns the ids it changed.

    The spool puts its files in order first. A job still ``started`` was
    running when the agent died. When its wrapper recorded how it ended, or
    still runs it, and ``attach`` is given, its ``JobRun`` goes to ``attach``:
    the caller waits for it (it keeps its timeout) and reports its real result.
    Otherwise how it ended is unknown: the runner kills what is left of its
    process group and removes its tree under ``work_root``, then it runs again
    if the job allows it and was not cancelled, else it is reported failed
    ("agent restarted") or cancelled, with the output it left.
    """
    changed = spool.recover()
    for entry in spool.entries(STARTED):
        changed.append(entry.job_id)
        mark = None
        if entry.pgid is not None:
            mark = runner.ProcessMark(
                entry.pgid,
                entry.boot_id,
                entry.leader_start,
                entry.wrapper_pid,
                entry.wrapper_start,
            )
        try:
            doc: JobDocument | None = spool.job(entry.job_id)
        except SpoolError as exc:
            log.error("job %s (%s): %s", entry.job_id, entry.name, exc)
            doc = None
        if attach is not None and work_root is not None and doc is not None and mark is not None:
            run = _reattach(entry, doc, mark, kill_grace, work_root)
            if run is not None:
                attach(run)
                continue
        if mark is not None:
            runner.kill_leftover(mark, kill_grace, f"job {entry.job_id} ({entry.name})")
        if work_root is not None:
            runner.remove_job_tree(work_root, entry.job_id)
        cancelled = spool.cancel_reason(entry.job_id)
        if doc is not None and doc.rerun_on_agent_crash and cancelled is None:
            spool.requeue(entry.job_id)
            log.warning(
                "job %s (%s): started -> received: agent restarted, the job reruns",
                entry.job_id,
                entry.name,
            )
            continue
        limit = doc.output_limit if doc is not None else RECOVERED_OUTPUT_LIMIT
        output, truncated = runner.read_output(entry.path / runner.OUTPUT_FILE, limit)
        report = status_report(
            entry,
            ReportedState.CANCELLED if cancelled is not None else ReportedState.FAILED,
            reason=cancelled if cancelled is not None else REASON_AGENT_RESTARTED,
            started=entry.started_at,
            output=output,
            truncated=truncated,
        )
        spool.mark_finished(entry.job_id, documents.render_status(report))
        log.warning(
            "job %s (%s): started -> %s: %s", entry.job_id, entry.name, report.state, report.reason
        )
    return sorted(changed)


def _reattach(
    entry: Entry, doc: JobDocument, mark: runner.ProcessMark, kill_grace: float, work_root: Path
) -> runner.JobRun | None:
    """The run of a job whose end is known or still to come, else None."""
    finished = runner.read_exit_record(entry.path, mark.wrapper_pid) is not None
    if not finished and not mark.wrapper_alive():
        # The wrapper may have written its record and exited between the two looks.
        finished = runner.read_exit_record(entry.path, mark.wrapper_pid) is not None
        if not finished:
            return None
    log.warning(
        "job %s (%s): %s while the agent was down; %s",
        entry.job_id,
        entry.name,
        "finished" if finished else "still running",
        "reporting its result" if finished else "re-attached to it",
    )
    return runner.attach_job(
        doc,
        entry.path,
        delivery_id=entry.delivery_id,
        mark=mark,
        started=entry.started_at or utc_now(),
        kill_grace=kill_grace,
        work_root=work_root,
    )


class Agent:
    def __init__(
        self,
        config: ClientConfig,
        transport: ServerTransport,
        spool: Spool,
        setup: runner.JobSetup,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.transport = transport
        self.spool = spool
        self.setup = setup
        self._sleep = sleep
        self._clock = clock
        self._last_contact = float("-inf")
        #: Per running job: how much output the server has, and when it was last sent.
        self._live_sent: dict[int, tuple[int, bool, float]] = {}
        #: Jobs whose acknowledgement told the server they run, not yet started here.
        self._announced: set[int] = set()
        #: What the agent says of itself with each poll (``presence`` in docs/PROTOCOL.md).
        self.presence: dict[str, str | bool] = {
            "version": __version__,
            "mode": AgentMode.ONCE.value,
            "callback": "",
        }

    def recover(self) -> list[runner.JobRun]:
        """Put the spool in order after a crash; the runs of jobs an earlier agent
        process started whose end is known or still to come."""
        attached: list[runner.JobRun] = []
        recover(self.spool, self.config.kill_grace, self.setup.work_root, attach=attached.append)
        purged = self.spool.purge(self.config.spool_retention)
        if purged:
            log.info("spool: purged %d old tombstones", purged)
        return attached

    def run(self) -> int:
        attached = self.recover()
        try:
            if attached and not self._finish_attached(attached):
                return 1
            while True:
                if not self.deliver_reports():
                    return 1
                added = self._handle(self._poll_waiting_out_pauses(self.config.poll_batch))
                runnable = self.spool.runnable()
                if not added and not runnable:
                    return 0 if self.deliver_reports() else 1
                for entry in runnable:
                    if not self._run(entry):
                        return 1
        except RetryLater as exc:
            # The server is busy, not broken: what is spooled waits for the next run.
            log.info("the server asks for a pause of %g s; the next run goes on", exc.seconds)
            return 0

    # Talking to the server.

    def _poll(self, limit: int, woken: bool = False) -> PollAnswer:
        """``woken``: the server's ``poll_now`` asked for this poll."""
        presence = self.presence | {WOKEN: True} if woken else self.presence
        answer = self.transport.poll(
            self.spool.held_ids(), self.spool.running_ids(), limit, presence
        )
        self._last_contact = self._clock()
        return answer

    def _poll_waiting_out_pauses(self, limit: int) -> PollAnswer:
        """``_poll``; a pause of up to ``SHORT_PAUSE`` the servers ask for is
        waited out (once per call), a longer one raises ``RetryLater``."""
        try:
            return self._poll(limit)
        except RetryLater as exc:
            if exc.seconds > SHORT_PAUSE:
                raise
            self._wait_out(exc)
        return self._poll(limit)

    def _wait_out(self, pause: RetryLater) -> None:
        delay = failover.stretch(pause.seconds)
        log.info("the server asks for a pause: polling again in %.1f s", delay)
        self._sleep(delay)

    def _handle(self, answer: PollAnswer) -> int:
        """Spool and acknowledge the delivered jobs, apply the reconcile list.
        Returns how many jobs were new to the spool."""
        deliveries: list[tuple[int, str]] = []
        new_ids: list[int] = []
        added = 0
        for job in answer.jobs:
            doc = job.doc
            try:
                new = self.spool.add(job.xml, doc)
            except (OSError, SpoolError) as exc:
                log.error(
                    "job %s (%s): cannot spool it, not acknowledging: %s", doc.job_id, doc.name, exc
                )
                continue
            if new:
                added += 1
                new_ids.append(doc.job_id)
                self._transition(
                    doc.job_id, doc.name, "sent", RECEIVED, f"delivery {doc.delivery_id}"
                )
            else:
                log.info(
                    "job %s (%s) on %s: duplicate delivery %s, acknowledged again, not run",
                    doc.job_id,
                    doc.name,
                    self.config.name,
                    doc.delivery_id,
                )
            deliveries.append((doc.job_id, doc.delivery_id))
        # Before the acknowledgement: a job cancelled now is not said to start.
        for item in answer.reconcile:
            self._reconcile(item)
        if deliveries:
            now = utc_now()
            starting = {job_id: now for job_id in self._starting_now(new_ids)}
            ack = self.transport.acknowledge(deliveries, starting)
            # Their acknowledgement said running: _start sends no running report.
            self._announced.update(ack.started)
            acknowledged = set(ack.acknowledged)
            for job_id, delivery in deliveries:
                if job_id not in acknowledged:
                    log.warning(
                        "job %s: the server did not acknowledge delivery %s", job_id, delivery
                    )
        return added

    def _starting_now(self, new_ids: list[int]) -> list[int]:
        """Of the jobs a poll just brought, the ones the agent starts right
        after (their acknowledgement says they run, which saves a call): in
        normal mode the first runnable job, when it is one of them."""
        runnable = self.spool.runnable()
        return [runnable[0].job_id] if runnable and runnable[0].job_id in new_ids else []

    def _reconcile(self, item: Reconcile) -> None:
        entry = self.spool.get(item.job_id)
        if entry is None:
            log.debug("job %s: reconcile %s for a job not in the spool", item.job_id, item.action)
            return
        if item.action == ReconcileAction.UNKNOWN:
            if self.spool.drop(entry.job_id, UNKNOWN_REASON):
                self._transition(entry.job_id, entry.name, RECEIVED, "dropped", UNKNOWN_REASON)
            elif entry.state == STARTED:
                # Its report will tell; killing work on a possibly stale view would be worse.
                log.warning(
                    "job %s (%s): running but unknown to the server", entry.job_id, entry.name
                )
            return
        cancelled = item.action == ReconcileAction.CANCELLED
        reason = runner.CANCELLED_REASON if cancelled else EXPIRED_REASON
        if entry.state == RECEIVED:
            report = status_report(entry, ReportedState.CANCELLED, reason=reason)
            if self.spool.drop(entry.job_id, reason, documents.render_status(report)):
                self._transition(entry.job_id, entry.name, RECEIVED, "cancelled", reason)
        elif entry.state == STARTED and cancelled:
            self.spool.request_cancel(entry.job_id, reason)
            log.info("job %s (%s): cancelled by the server while running", entry.job_id, entry.name)

    def _heartbeat(self) -> None:
        """Poll with limit 0: the server learns we live, we learn of cancellations."""
        try:
            self._handle(self._poll(0))
        except RetryLater as exc:
            log.info("heartbeat: the server asks for a pause of %g s", exc.seconds)
        except (TransportError, ServerFault) as exc:
            log.warning("heartbeat failed: %s", exc)

    def deliver_reports(self) -> bool:
        """Send every pending report; retry with a jittered backoff for
        ``report_retry_for`` seconds. True when none is left. A pause the
        servers ask for that does not fit in what is left raises ``RetryLater``."""
        start = self._clock()
        backoff = failover.Backoff(REPORT_BACKOFF_START, REPORT_BACKOFF_MAX)
        while True:
            pending = self.spool.pending_reports()
            if not pending:
                return True
            try:
                if self._send_reports(pending):
                    backoff.reset()
                    continue
                delay = backoff.next()
            except RetryLater as exc:
                delay = failover.stretch(exc.seconds)
                if self._clock() - start + delay > self.config.report_retry_for:
                    raise
                log.info("the server asks for a pause: reporting again in %.1f s", delay)
                self._sleep(delay)
                continue
            left = len(self.spool.pending_reports())
            if self._clock() - start + delay > self.config.report_retry_for:
                log.error("%d report(s) undelivered; they stay in the spool for the next run", left)
                return False
            log.warning("%d report(s) undelivered; retrying in %.1f s", left, delay)
            self._sleep(delay)

    def _send_reports(self, pending: list[tuple[int, str]]) -> bool:
        """One attempt at each report, several per call; False when the server
        could not take them, ``RetryLater`` when it asked for a pause."""
        for chunk in report_chunks(pending):
            try:
                outcomes = self.transport.report_many([status_xml for _, status_xml in chunk])
            except RetryLater:
                raise  # the caller waits as asked
            except TransportError as exc:
                log.warning("%d report(s) not delivered: %s", len(chunk), exc)
                return False  # no server answers: the others would fail the same way
            except ServerFault as exc:
                if not exc.permanent or len(chunk) == 1:
                    outcomes = [exc]
                else:
                    # Refused as a whole: each report alone, so one bad report
                    # cannot cost the others.
                    outcomes = self._report_one_by_one(chunk)
            for (job_id, _), outcome in zip(chunk, outcomes, strict=True):
                if not self._reported(job_id, outcome):
                    return False
        return True

    def _report_one_by_one(self, chunk: list[tuple[int, str]]) -> list[ReportAnswer | ServerFault]:
        outcomes: list[ReportAnswer | ServerFault] = []
        for _, status_xml in chunk:
            try:
                outcomes.append(self.transport.report(status_xml))
            except ServerFault as exc:
                if not exc.permanent:
                    raise
                outcomes.append(exc)
        return outcomes

    def _reported(self, job_id: int, outcome: ReportAnswer | ServerFault) -> bool:
        """Mark one report delivered (or dropped, when refused for good); False
        when the server could not take it now."""
        entry = self.spool.get(job_id)
        name = entry.name if entry is not None else ""
        if isinstance(outcome, ServerFault):
            if not outcome.permanent:
                log.warning("job %s (%s): report not taken now: %s", job_id, name, outcome)
                return False
            # Retrying cannot help; keeping it would block every later run.
            log.error("job %s (%s): report refused, dropping it: %s", job_id, name, outcome)
            self.spool.mark_reported(job_id)
            return True
        self.spool.mark_reported(job_id)
        log.info(
            "job %s (%s) on %s: %s reported (%s)",
            job_id,
            name,
            self.config.name,
            outcome.state,
            outcome.result,
        )
        return True

    # Running.

    def _run(self, entry: Entry) -> bool:
        """Run one spooled job and deliver its report; False when reports stay undelivered."""
        if self._clock() - self._last_contact >= self.config.heartbeat_interval:
            self._heartbeat()
        run = self._start(entry)
        if run is not None:
            report = runner.wait_job(
                run,
                self.config.heartbeat_interval,
                on_tick=lambda: self._send_live_output(run) or self._tick(run.job_id),
                clock=self._clock,
            )
            self._finished(run, report)
        try:
            return self.deliver_reports()
        except RetryLater as exc:
            # The other spooled jobs still run; the report goes with the next try.
            log.info("the server asks for a pause of %g s; the report waits", exc.seconds)
            return True

    def _finish_attached(self, runs: list[runner.JobRun]) -> bool:
        """Wait for the runs an earlier agent process started, with heartbeats; False
        when their reports stay undelivered."""
        next_tick = self._clock()
        while runs:
            for run in list(runs):
                report = run.check()
                if report is not None:
                    runs.remove(run)
                    self._finished(run, report)
            if self._clock() >= next_tick:
                next_tick = self._clock() + self.config.heartbeat_interval
                self._heartbeat()
                for run in runs:
                    self._send_live_output(run)
                for run in runs:
                    reason = self.spool.cancel_reason(run.job_id)
                    if reason is not None:
                        run.stop("cancelled", runner.CANCELLED_REASON)
            if runs:
                self._sleep(runner.WAIT_STEP)
        return self.deliver_reports()

    def _start(self, entry: Entry) -> runner.JobRun | None:
        """Start one spooled job: its run, or None when it did not start (it is no
        longer runnable, or its final report is in the spool already)."""
        announced = entry.job_id in self._announced
        self._announced.discard(entry.job_id)
        if not self._still_runnable(entry.job_id):
            return None
        try:
            doc = self.spool.job(entry.job_id)
        except SpoolError as exc:
            log.error("job %s (%s): %s", entry.job_id, entry.name, exc)
            self._fail_unrunnable(entry, str(exc))
            return None
        if not announced and not self._send_running(doc, entry):
            if not self._still_runnable(entry.job_id):
                return None
        self._transition(doc.job_id, doc.name, RECEIVED, "running")
        run = runner.start_job(
            doc,
            entry.path,
            setup=dataclasses.replace(self.setup, server=self.transport.current_server),
            delivery_id=entry.delivery_id,
            kill_grace=self.config.kill_grace,
            on_started=lambda mark: self.spool.mark_started(
                doc.job_id,
                mark.pgid,
                boot_id=mark.boot_id,
                leader_start=mark.leader_start,
                wrapper_pid=mark.wrapper_pid,
                wrapper_start=mark.wrapper_start,
            ),
            clock=self._clock,
        )
        if isinstance(run, StatusReport):
            self.spool.mark_finished(doc.job_id, documents.render_status(run))
            self._transition(doc.job_id, doc.name, "running", run.state, _summary(run))
            return None
        return run

    def _send_live_output(self, run: runner.JobRun) -> bool:
        """Send a running job's output so far in a ``running`` report, at most once
        per ``heartbeat_interval`` and only when there is more than the server has.
        Best effort: the final report carries all of it anyway. Returns False (so
        it chains before a tick with ``or``)."""
        now = self._clock()
        sent_length, sent_truncated, sent_at = self._live_sent.get(run.job_id, (0, False, -1e18))
        if now - sent_at < self.config.heartbeat_interval:
            return False
        text, truncated = run.output_so_far()
        if len(text) <= sent_length and truncated == sent_truncated:
            return False
        entry = self.spool.get(run.job_id)
        if entry is None:
            return False
        report = status_report(
            entry, ReportedState.RUNNING, started=run.started, output=text, truncated=truncated
        )
        try:
            self.transport.report(documents.render_status(report))
        except (TransportError, ServerFault) as exc:
            log.warning("job %s (%s): live output not delivered: %s", run.job_id, run.doc.name, exc)
            self._live_sent[run.job_id] = (sent_length, sent_truncated, now)
            return False
        self._live_sent[run.job_id] = (len(text), truncated, now)
        log.debug("job %s (%s): %d characters of output sent", run.job_id, run.doc.name, len(text))
        return False

    def _finished(self, run: runner.JobRun, report: StatusReport) -> None:
        """Journal a run's final report (it is delivered with the others)."""
        self._live_sent.pop(run.job_id, None)
        if report.state == ReportedState.CANCELLED:
            reason = self.spool.cancel_reason(run.job_id) or report.reason
            report = dataclasses.replace(report, reason=reason)
        self.spool.mark_finished(run.job_id, documents.render_status(report))
        self._transition(run.job_id, run.doc.name, "running", report.state, _summary(report))

    def _still_runnable(self, job_id: int) -> bool:
        current = self.spool.get(job_id)
        if current is None or current.state != RECEIVED:
            return False
        if self.spool.cancel_reason(job_id) is not None:
            return False
        return True

    def _send_running(self, doc: JobDocument, entry: Entry) -> bool:
        """Best effort; False when the server refused it (then reconcile is re-checked)."""
        report = status_report(entry, ReportedState.RUNNING, started=utc_now())
        try:
            self.transport.report(documents.render_status(report))
        except TransportError as exc:
            log.warning("job %s (%s): running report not delivered: %s", doc.job_id, doc.name, exc)
        except ServerFault as exc:
            log.warning("job %s (%s): running report refused: %s", doc.job_id, doc.name, exc)
            if exc.permanent:
                self._heartbeat()  # a refusal often means a cancellation we have not heard of
                return False
        return True

    def _tick(self, job_id: int) -> bool:
        self._heartbeat()
        return self.spool.cancel_reason(job_id) is not None

    def _fail_unrunnable(self, entry: Entry, reason: str) -> None:
        report = status_report(entry, ReportedState.FAILED, reason=reason)
        self.spool.drop(entry.job_id, reason, documents.render_status(report))
        self._transition(entry.job_id, entry.name, RECEIVED, "failed", reason)

    def _transition(self, job_id: int, name: str, old: str, new: str, detail: str = "") -> None:
        suffix = f" ({detail})" if detail else ""
        log.info(
            "job %s (%s) on %s: %s -> %s%s",
            job_id,
            name,
            self.config.name,
            old,
            new,
            suffix,
            extra=logformat.event(
                job=job_id,
                client=self.config.name,
                who=f"client:{self.config.name}",
                what=f"{old} -> {new}",
                server=self.transport.current_server,
            ),
        )


def report_chunks(pending: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """Pending reports in calls of at most ``REPORTS_PER_CALL_MAX`` reports and
    ``REPORT_CALL_BYTES`` of XML (a larger report goes alone)."""
    chunks: list[list[tuple[int, str]]] = []
    size = 0
    for item in pending:
        if (
            not chunks
            or len(chunks[-1]) >= REPORTS_PER_CALL_MAX
            or size + len(item[1]) > REPORT_CALL_BYTES
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += len(item[1])
    return chunks


def _summary(report: StatusReport) -> str:
    parts = []
    if report.exit_code is not None:
        parts.append(f"exit {report.exit_code}")
    if report.started is not None and report.finished is not None:
        parts.append(f"{(report.finished - report.started).total_seconds():.1f} s")
    if report.reason:
        parts.append(report.reason)
    if report.truncated:
        parts.append("output truncated")
    return ", ".join(parts)
