"""Runs one job as its own process: timeout, output cap, heartbeats, kill.

The runner owns the job's process group, in this agent's life and after it:
nothing else signals one.

The job runs as ``interpreter script`` in a new session (so its whole process
group can be signalled, and it survives an agent crash for ``kill_leftover``
to find), with stdin from /dev/null and stdout and stderr into one file.

A gate makes "started is on disk before the job runs" exact: the process is
first a ``/bin/sh`` that waits for one line on its stdin. The runner spawns
it, hands its ``ProcessMark`` (process group id, boot, leader start time) to
``on_started`` -- which journals it -- and only then writes the go-ahead; the
shell swaps stdin for /dev/null and execs the interpreter in the same process.
If the agent dies before the go-ahead, the shell reads end-of-file and exits
without running anything.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scire_schema.documents import JobDocument, StatusReport
from scire_schema.protocol import utc_now

log = logging.getLogger(__name__)

SCRIPT_FILE = "script"
OUTPUT_FILE = "output"
WAIT_STEP = 0.1  # seconds between checks of the process, the timeout and the heartbeat
GATE_EXIT = 125  # the gate's exit status when it never got the go-ahead
_GO = b"go\n"
_GATE = f'IFS= read -r go && [ "$go" = go ] || exit {GATE_EXIT}; exec "$@" </dev/null'

CANCELLED_REASON = "cancelled by the server"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_KILL_POLL = 0.05  # seconds between checks that a leftover process group is gone


@dataclass(frozen=True)
class ProcessMark:
    """What tells a job's process group from another after the agent restarts.

    A process group id alone does not: after a reboot, or once the group is
    gone, the number may name someone else's processes. ``None`` means the
    value could not be read (no ``/proc``); that check is then skipped.
    """

    pgid: int
    boot_id: str | None = None  #: the boot the group was started in
    leader_start: int | None = None  #: the leader's start time, clock ticks since boot

    @classmethod
    def take(cls, pgid: int) -> ProcessMark:
        """The mark of the live group ``pgid``, read while its leader runs."""
        return cls(pgid, _boot_id(), _process_start(pgid))

    def still_ours(self) -> bool:
        """False when the group provably is not the job's any more."""
        if self.boot_id is not None and self.boot_id != _boot_id():
            return False  # the host rebooted: the group died with it, its number may be reused
        current_start = _process_start(self.pgid)
        if (
            self.leader_start is not None
            and current_start is not None
            and current_start != self.leader_start
        ):
            return False  # the leader's pid belongs to a newer process now
        # Else the group is ours: the kernel does not reuse a pid while it names a live group.
        return True


def kill_leftover(mark: ProcessMark, kill_grace: float, what: str) -> None:
    """Kill what is left of a job's process group after an agent crash, if it is
    still there and still the job's: SIGTERM, then SIGKILL after ``kill_grace``.
    ``what`` names the job in the log."""
    if not mark.still_ours():
        return
    try:
        os.killpg(mark.pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        log.error("%s: cannot kill process group %s: not ours", what, mark.pgid)
        return
    log.warning("%s: killing leftover process group %s", what, mark.pgid)
    deadline = time.monotonic() + kill_grace
    while time.monotonic() < deadline:
        if not _group_alive(mark.pgid):
            return
        time.sleep(_KILL_POLL)
    _signal_group(mark.pgid, signal.SIGKILL)


def read_output(path: Path, limit: int) -> tuple[str, bool]:
    """The first ``limit`` bytes of ``path`` as text, and whether there was more."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
            truncated = bool(fh.read(1))
    except FileNotFoundError:
        return "", False
    return data.decode("utf-8", errors="replace"), truncated


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # every process of the group has exited already


def run_job(
    doc: JobDocument,
    entry_dir: Path,
    *,
    delivery_id: str,
    kill_grace: float,
    tick_interval: float,
    on_started: Callable[[ProcessMark], None],
    on_tick: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> StatusReport:
    """Run ``doc`` in ``entry_dir`` and return its final status.

    ``on_started(mark)`` runs after the spawn and before the script may
    start; ``on_tick()`` runs every ``tick_interval`` seconds and returns True
    when the job must be cancelled.
    """
    script_path = entry_dir / SCRIPT_FILE
    output_path = entry_dir / OUTPUT_FILE
    script_path.write_text(doc.script, encoding="utf-8")
    env = {
        **os.environ,
        "SCIRE_JOB_ID": str(doc.job_id),
        "SCIRE_DELIVERY_ID": delivery_id,
        "SCIRE_JOB_NAME": doc.name,
    }
    started = utc_now()
    with open(output_path, "wb") as output:
        gate_read, gate_write = os.pipe()
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", _GATE, "scire-job", doc.interpreter, str(script_path)],
                stdin=gate_read,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=entry_dir,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(gate_write)
            return _report(doc, delivery_id, "failed", started, reason=f"cannot start: {exc}")
        finally:
            os.close(gate_read)
    with os.fdopen(gate_write, "wb") as gate:
        try:
            on_started(ProcessMark.take(proc.pid))
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        try:
            gate.write(_GO)
        except BrokenPipeError:
            pass  # the gate died; its exit status tells the rest
    log.debug("job %s (%s): process group %s started", doc.job_id, doc.name, proc.pid)
    try:
        state, reason = _wait(proc, doc, kill_grace, tick_interval, on_tick, clock)
    except BaseException:
        # The agent is going down (an error in on_tick, ^C): take the job with it;
        # its journal still says started, so the next run's recover() reports it.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finished = utc_now()
    output_text, truncated = read_output(output_path, doc.output_limit)
    code = proc.returncode
    if code < 0:
        # Shells report death by signal N as 128 + N; the reason names the signal.
        signame = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        reason = reason or f"killed by signal {-code} ({signame})"
        code = 128 - code
    if state is None:
        state = "succeeded" if code == 0 else "failed"
    return _report(doc, delivery_id, state, started, finished, code, reason, output_text, truncated)


def _wait(
    proc: subprocess.Popen[bytes],
    doc: JobDocument,
    kill_grace: float,
    tick_interval: float,
    on_tick: Callable[[], bool],
    clock: Callable[[], float],
) -> tuple[str | None, str | None]:
    """Wait for the job; returns (forced state, reason) when it had to be stopped."""
    start = clock()
    deadline = start + doc.timeout
    next_tick = start + tick_interval
    while True:
        now = clock()
        try:
            proc.wait(timeout=max(0.0, min(WAIT_STEP, deadline - now, next_tick - now)))
            return None, None
        except subprocess.TimeoutExpired:
            pass
        now = clock()
        if now >= deadline:
            log.warning("job %s (%s): timed out after %s s", doc.job_id, doc.name, doc.timeout)
            _stop(proc, kill_grace)
            return "timed_out", f"timed out after {doc.timeout} s"
        if now >= next_tick:
            next_tick = now + tick_interval
            if on_tick():
                log.warning("job %s (%s): cancelled while running", doc.job_id, doc.name)
                _stop(proc, kill_grace)
                return "cancelled", CANCELLED_REASON


def _stop(proc: subprocess.Popen[bytes], kill_grace: float) -> None:
    """SIGTERM the group, SIGKILL it after ``kill_grace``; then nothing of it is left."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=kill_grace)
    except subprocess.TimeoutExpired:
        log.warning("process group %s ignored SIGTERM for %s s: SIGKILL", proc.pid, kill_grace)
    # Children that outlived the leader (or ignored SIGTERM) go too.
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _report(
    doc: JobDocument,
    delivery_id: str,
    state: str,
    started: dt.datetime,
    finished: dt.datetime | None = None,
    exit_code: int | None = None,
    reason: str | None = None,
    output: str | None = None,
    truncated: bool = False,
) -> StatusReport:
    return StatusReport(
        job_id=doc.job_id,
        delivery_id=delivery_id,
        state=state,
        exit_code=exit_code,
        started=started,
        finished=finished or utc_now(),
        reason=reason,
        output=output,
        truncated=truncated,
    )
