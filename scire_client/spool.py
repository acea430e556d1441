"""The agent's only persistence, and the basis of exactly-once execution.

One directory per job under ``state_dir/spool/<job_id>/``:

``job.xml``     the job file as delivered; written before the agent acknowledges
``state``       the journal (JSON), rewritten atomically at each step:
                received -> started -> finished -> reported, or received -> dropped
``script``      the script as run (written by the runner)
``output``      the job's stdout and stderr
``result.xml``  the final status document, written before the state says finished
``cancelled``   marker: the server cancelled the job; its text is the reason

Every file is written to a temporary name, fsynced, renamed over the old one,
and the directory fsynced, so a crash leaves the old or the new version,
never half of one. An entry exists once its ``state`` file does; ``add``
writes it last. ``started`` is on disk, with the process group, before the
job's script can run (see ``runner.py``), so after a crash ``recover`` knows
exactly which jobs may have run and kills what is left of them.

Entries outlive their report as tombstones for ``spool_retention``: a job id
already in the spool is never run again, whatever the delivery. Only the
process holding ``lock.hold`` writes, so the journals are cached in memory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scire_client import runner
from scire_client.exceptions import SpoolError
from scire_server import documents
from scire_server.documents import JobDocument, StatusReport
from scire_server.exceptions import InvalidDocument
from scire_server.pki import fsync_dir, write_atomic

log = logging.getLogger(__name__)

RECEIVED = "received"
STARTED = "started"
FINISHED = "finished"
REPORTED = "reported"
DROPPED = "dropped"  # tombstone of a job that never ran and has nothing to report
STATES = (RECEIVED, STARTED, FINISHED, REPORTED, DROPPED)

JOB_FILE = "job.xml"
STATE_FILE = "state"
RESULT_FILE = "result.xml"
CANCEL_FILE = "cancelled"

REASON_AGENT_RESTARTED = "agent restarted"
RECOVERED_OUTPUT_LIMIT = 64 * 1024  # bytes, when the job file cannot tell its own limit
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_KILL_POLL = 0.05  # seconds between checks that an orphaned process group is gone


@dataclass(frozen=True)
class Entry:
    """What the journal says of one job; ``Spool.job`` reads the job file itself."""

    job_id: int
    state: str
    delivery_id: str
    name: str
    priority: int
    created: dt.datetime
    path: Path
    pgid: int | None = None
    started_at: dt.datetime | None = None
    updated_at: float = 0.0  # seconds since the epoch

    @property
    def script_path(self) -> Path:
        return self.path / runner.SCRIPT_FILE

    @property
    def output_path(self) -> Path:
        return self.path / runner.OUTPUT_FILE


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._journals: dict[int, dict[str, Any]] | None = None
        self._damaged: set[int] = set()

    # Reading.

    def entries(self, *states: str) -> list[Entry]:
        """Every committed entry (or those in ``states``), by job id."""
        return [
            self._entry(job_id, journal)
            for job_id, journal in sorted(self._load().items())
            if not states or journal["state"] in states
        ]

    def get(self, job_id: int) -> Entry | None:
        journal = self._load().get(job_id)
        return None if journal is None else self._entry(job_id, journal)

    def job(self, job_id: int) -> JobDocument:
        path = self._dir(job_id) / JOB_FILE
        try:
            return documents.parse_job(path.read_bytes())
        except (OSError, InvalidDocument) as exc:
            raise SpoolError(f"spool entry {job_id}: cannot read {JOB_FILE}: {exc}") from exc

    def runnable(self) -> list[Entry]:
        """Received, not cancelled: priority high to low, then oldest, then job id."""
        ready = [e for e in self.entries(RECEIVED) if self.cancel_reason(e.job_id) is None]
        return sorted(ready, key=lambda e: (-e.priority, e.created, e.job_id))

    def held_ids(self) -> list[int]:
        """Jobs the agent holds and has not run, or ran but not yet reported:
        the server must not take any of them for vanished."""
        return [e.job_id for e in self.entries(RECEIVED, FINISHED)]

    def running_ids(self) -> list[int]:
        return [e.job_id for e in self.entries(STARTED)]

    def pending_reports(self) -> list[tuple[int, str]]:
        """(job id, status XML) of every finished entry not yet reported."""
        return [(e.job_id, self._read_result(e.job_id)) for e in self.entries(FINISHED)]

    def cancel_reason(self, job_id: int) -> str | None:
        try:
            return (self._dir(job_id) / CANCEL_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    # Writing.

    def add(self, xml_text: str, doc: JobDocument) -> bool:
        """Spool a delivered job. False when its id is in the spool already.

        A duplicate is never run again. When it comes with a new delivery id
        (the server re-leased it, e.g. because our acknowledgement was lost)
        the entry adopts that id, and a finished job's result is queued again
        under it, so the server's current lease gets the outcome.
        """
        journal = self._load().get(doc.job_id)
        if doc.job_id in self._damaged:
            log.error(
                "job %s (%s): its spool entry is damaged; not running it", doc.job_id, doc.name
            )
            return False
        if journal is not None:
            self._adopt_delivery(doc.job_id, journal, doc.delivery_id)
            return False
        path = self._dir(doc.job_id)
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / JOB_FILE, xml_text.encode("utf-8"))
        self._write_journal(
            doc.job_id,
            {
                "state": RECEIVED,
                "delivery_id": doc.delivery_id,
                "name": doc.name,
                "priority": doc.priority,
                "created": documents.format_time(doc.created),
            },
        )
        fsync_dir(self.root)
        return True

    def mark_started(self, job_id: int, pgid: int) -> None:
        """Journal the start, with what ``recover`` needs to find the process group."""
        self._update(
            job_id,
            state=STARTED,
            pgid=pgid,
            boot_id=_boot_id(),
            leader_start=_process_start(pgid),
            started_at=documents.format_time(_now()),
        )

    def mark_finished(self, job_id: int, status_xml: str) -> None:
        write_atomic(self._dir(job_id) / RESULT_FILE, status_xml.encode("utf-8"))
        self._update(job_id, state=FINISHED)

    def mark_reported(self, job_id: int) -> None:
        self._update(job_id, state=REPORTED)

    def request_cancel(self, job_id: int, reason: str) -> None:
        """Leave the marker a running job's heartbeat looks for (and ``runnable`` skips)."""
        if self.cancel_reason(job_id) is None:
            write_atomic(self._dir(job_id) / CANCEL_FILE, reason.encode("utf-8"))

    def drop(self, job_id: int, reason: str, report_xml: str | None = None) -> bool:
        """Never run a received job. With ``report_xml`` the drop is reported, else
        the entry becomes a silent tombstone. False when the job was not waiting."""
        entry = self.get(job_id)
        if entry is None or entry.state != RECEIVED:
            return False
        self.request_cancel(job_id, reason)
        if report_xml is not None:
            self.mark_finished(job_id, report_xml)
        else:
            self._update(job_id, state=DROPPED)
        return True

    def recover(self, kill_grace: float) -> list[int]:
        """Finish what a dead agent left; returns the ids it changed.

        Entries without a journal were never acknowledged and are removed. A
        ``started`` entry with a result died before its journal said finished.
        One without a result was running when the agent died: what is left of
        its process group is killed, then it runs again if the job allows it,
        else it fails with reason "agent restarted".
        """
        self._remove_uncommitted()
        changed = []
        for entry in self.entries(STARTED):
            changed.append(entry.job_id)
            if (entry.path / RESULT_FILE).exists():
                self._update(entry.job_id, state=FINISHED)
                continue
            self._kill_orphan(entry, kill_grace)
            try:
                doc: JobDocument | None = self.job(entry.job_id)
            except SpoolError as exc:
                log.error("job %s (%s): %s", entry.job_id, entry.name, exc)
                doc = None
            cancelled = self.cancel_reason(entry.job_id)
            if doc is not None and doc.rerun_on_agent_crash and cancelled is None:
                self._update(entry.job_id, state=RECEIVED, pgid=None, started_at=None)
                log.warning(
                    "job %s (%s): started -> received: agent restarted, the job reruns",
                    entry.job_id,
                    entry.name,
                )
                continue
            limit = doc.output_limit if doc is not None else RECOVERED_OUTPUT_LIMIT
            output, truncated = runner.read_output(entry.output_path, limit)
            report = StatusReport(
                job_id=entry.job_id,
                delivery_id=entry.delivery_id,
                state="cancelled" if cancelled is not None else "failed",
                started=entry.started_at,
                finished=_now(),
                reason=cancelled if cancelled is not None else REASON_AGENT_RESTARTED,
                output=output,
                truncated=truncated,
            )
            self.mark_finished(entry.job_id, documents.render_status(report))
            log.warning(
                "job %s (%s): started -> %s: %s",
                entry.job_id,
                entry.name,
                report.state,
                report.reason,
            )
        return changed

    def purge(self, older_than: float) -> int:
        """Remove reported and dropped tombstones last touched ``older_than`` seconds ago."""
        cutoff = time.time() - older_than
        removed = 0
        for entry in self.entries(REPORTED, DROPPED):
            if entry.updated_at < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                self._load().pop(entry.job_id, None)
                removed += 1
        if removed:
            fsync_dir(self.root)
        return removed

    # Internals.

    def _dir(self, job_id: int) -> Path:
        return self.root / str(job_id)

    def _load(self) -> dict[int, dict[str, Any]]:
        if self._journals is None:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            journals: dict[int, dict[str, Any]] = {}
            for path in self.root.iterdir():
                if not path.name.isdigit() or not (path / STATE_FILE).exists():
                    continue
                try:
                    journal = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
                    if journal.get("state") not in STATES:
                        raise ValueError(f"unknown state {journal.get('state')!r}")
                    documents.parse_time(journal["created"])
                    str(journal["delivery_id"])
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    # Left in place for an operator, and its id never runs; we cannot tell
                    # whether it ran, so running it again could break exactly-once.
                    log.error("spool entry %s is damaged, ignoring it: %s", path, exc)
                    self._damaged.add(int(path.name))
                    continue
                journals[int(path.name)] = journal
            self._journals = journals
        return self._journals

    def _entry(self, job_id: int, journal: dict[str, Any]) -> Entry:
        started_at = journal.get("started_at")
        return Entry(
            job_id=job_id,
            state=journal["state"],
            delivery_id=journal["delivery_id"],
            name=journal.get("name", ""),
            priority=int(journal.get("priority", 0)),
            created=documents.parse_time(journal["created"]),
            path=self._dir(job_id),
            pgid=journal.get("pgid"),
            started_at=documents.parse_time(started_at) if started_at else None,
            updated_at=float(journal.get("updated_at", 0.0)),
        )

    def _write_journal(self, job_id: int, journal: dict[str, Any]) -> None:
        journal = {**journal, "updated_at": time.time()}
        write_atomic(self._dir(job_id) / STATE_FILE, json.dumps(journal, sort_keys=True).encode())
        self._load()[job_id] = journal

    def _update(self, job_id: int, **changes: Any) -> None:
        journal = self._load().get(job_id)
        if journal is None:
            raise SpoolError(f"job {job_id} is not in the spool")
        self._write_journal(job_id, {**journal, **changes})

    def _read_result(self, job_id: int) -> str:
        try:
            return (self._dir(job_id) / RESULT_FILE).read_text(encoding="utf-8")
        except OSError as exc:
            raise SpoolError(f"spool entry {job_id}: cannot read {RESULT_FILE}: {exc}") from exc

    def _adopt_delivery(self, job_id: int, journal: dict[str, Any], delivery_id: str) -> None:
        if journal["delivery_id"] == delivery_id:
            return
        changes: dict[str, Any] = {"delivery_id": delivery_id}
        if journal["state"] in (FINISHED, REPORTED):
            try:
                result = documents.parse_status(self._read_result(job_id))
            except InvalidDocument as exc:
                raise SpoolError(f"spool entry {job_id}: {RESULT_FILE} is damaged: {exc}") from exc
            renewed = dataclasses.replace(result, delivery_id=delivery_id)
            write_atomic(self._dir(job_id) / RESULT_FILE, documents.render_status(renewed).encode())
            changes["state"] = FINISHED
        self._update(job_id, **changes)
        log.info(
            "job %s (%s): delivery %s replaces %s",
            job_id,
            journal.get("name", ""),
            delivery_id,
            journal["delivery_id"],
        )

    def _remove_uncommitted(self) -> None:
        if not self.root.exists():
            return
        committed = self._load()
        for path in self.root.iterdir():
            if path.name.isdigit() and int(path.name) not in committed:
                if not (path / STATE_FILE).exists():
                    shutil.rmtree(path, ignore_errors=True)

    def _kill_orphan(self, entry: Entry, kill_grace: float) -> None:
        """Kill the job's process group if it is still there and still ours."""
        pgid = entry.pgid
        if pgid is None:
            return
        journal = self._load()[entry.job_id]
        boot_id = journal.get("boot_id")
        if boot_id is not None and boot_id != _boot_id():
            return  # the host rebooted: the group died with it, its number may be reused
        leader_start = journal.get("leader_start")
        current_start = _process_start(pgid)
        if leader_start is not None and current_start is not None and leader_start != current_start:
            return  # the leader's pid belongs to a newer process now
        # Else the group is ours: the kernel does not reuse a pid while it names a live group.
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        except PermissionError:
            log.error("job %s: cannot kill process group %s: not ours", entry.job_id, pgid)
            return
        log.warning(
            "job %s (%s): killing leftover process group %s", entry.job_id, entry.name, pgid
        )
        deadline = time.monotonic() + kill_grace
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(_KILL_POLL)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
