"""The agent's only persistence, and the basis of exactly-once execution.

One directory per job under ``state_dir/spool/<job_id>/``:

``job.xml``     the job file as delivered; written before the agent acknowledges
``state``       the journal (JSON), rewritten atomically at each step:
                received -> started -> finished -> reported, or received -> dropped
``script``      a copy of the script as run (the runner runs its own in the job's tree)
``output``      the job's stdout and stderr
``exit_status`` the exit record the job's wrapper writes when the job ends (``jobwrapper``)
``result.xml``  the final status document, written before the state says finished
``cancelled``   marker: the server cancelled the job; its text is the reason

Every file is written to a temporary name, fsynced, renamed over the old one,
and the directory fsynced, so a crash leaves the old or the new version,
never half of one. An entry exists once its ``state`` file does; ``add``
writes it last. ``started`` is on disk, with the mark of the process group,
before the job's script can run (see ``runner.py``), so after a crash the
agent knows exactly which jobs may have run, and the runner can kill what is
left of them. The spool only stores: it never signals a process or decides
what becomes of a job.

Entries outlive their report as tombstones for ``spool_retention``: a job id
already in the spool is never run again, whatever the delivery. Only the
process holding ``lock.hold`` writes, so the journals are cached in memory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scire_client.exceptions import SpoolError
from scire_schema import documents
from scire_schema.documents import JobDocument
from scire_schema.errors import DocumentError
from scire_schema.files import fsync_dir, write_atomic
from scire_schema.protocol import format_time, parse_time, utc_now

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
    pgid: int | None = None  #: the job's process group, once started
    boot_id: str | None = None  #: with ``leader_start``: the runner's proof the group is the job's
    leader_start: int | None = None
    wrapper_pid: int | None = None  #: the job's wrapper, which records how it ended
    wrapper_start: int | None = None
    started_at: dt.datetime | None = None
    updated_at: float = 0.0  # seconds since the epoch


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
        except (OSError, DocumentError) as exc:
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
        if journal is not None and self._retried(journal, doc):
            # An operator's retry of a run that ended here: a new run of the job.
            log.info(
                "job %s (%s): retried by an operator; the ended run's entry makes way",
                doc.job_id,
                doc.name,
            )
            shutil.rmtree(self._dir(doc.job_id))
            self._load().pop(doc.job_id, None)
            journal = None
        if journal is not None:
            self._adopt_delivery(doc.job_id, journal, doc.delivery_id)
            return False
        path = self._dir(doc.job_id)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path / JOB_FILE, xml_text.encode("utf-8"))
        self._write_journal(
            doc.job_id,
            {
                "state": RECEIVED,
                "delivery_id": doc.delivery_id,
                "name": doc.name,
                "priority": doc.priority,
                "created": format_time(doc.created),
                "retry_base": doc.retry_base,
            },
        )
        fsync_dir(self.root)
        return True

    @staticmethod
    def _retried(journal: dict[str, Any], doc: JobDocument) -> bool:
        """Whether ``doc`` is an operator's retry of the run ``journal`` holds:
        a later retry, of a run that ended (a run still going adopts the delivery)."""
        return doc.retry_base > int(journal.get("retry_base", 0)) and journal["state"] in (
            FINISHED,
            REPORTED,
            DROPPED,
        )

    def mark_started(
        self,
        job_id: int,
        pgid: int,
        *,
        boot_id: str | None = None,
        leader_start: int | None = None,
        wrapper_pid: int | None = None,
        wrapper_start: int | None = None,
    ) -> None:
        """Journal the start, with the runner's mark of the process group and of
        its wrapper (``runner.ProcessMark``), kept for the runner after a crash."""
        self._update(
            job_id,
            state=STARTED,
            pgid=pgid,
            boot_id=boot_id,
            leader_start=leader_start,
            wrapper_pid=wrapper_pid,
            wrapper_start=wrapper_start,
            started_at=format_time(utc_now()),
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

    def recover(self) -> list[int]:
        """Put the files in order after a crash; returns the ids it finished.

        Entries without a journal were never acknowledged and are removed. A
        ``started`` entry with a result died between writing it and its journal
        saying finished: it is finished now. The ``started`` entries left were
        running when the agent died; what becomes of them is the agent's call.
        """
        self._remove_uncommitted()
        finished = []
        for entry in self.entries(STARTED):
            if (entry.path / RESULT_FILE).exists():
                self._update(entry.job_id, state=FINISHED)
                finished.append(entry.job_id)
        return finished

    def requeue(self, job_id: int) -> None:
        """A started job whose run was lost waits to run again."""
        self._update(
            job_id,
            state=RECEIVED,
            pgid=None,
            boot_id=None,
            leader_start=None,
            wrapper_pid=None,
            wrapper_start=None,
            started_at=None,
        )

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
                    parse_time(journal["created"])
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
            created=parse_time(journal["created"]),
            path=self._dir(job_id),
            pgid=journal.get("pgid"),
            boot_id=journal.get("boot_id"),
            leader_start=journal.get("leader_start"),
            wrapper_pid=journal.get("wrapper_pid"),
            wrapper_start=journal.get("wrapper_start"),
            started_at=parse_time(started_at) if started_at else None,
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
            except DocumentError as exc:
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
