"""The agent's spool on real files, with real (orphaned) process groups."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from scire_client import agent
from scire_client import spool as spool_module
from scire_client.spool import Spool
from scire_schema import documents
from scire_schema.documents import JobDocument, StatusReport

CREATED = dt.datetime(2024, 1, 1, 12, 0, 0)


def make_job(job_id: int, **changes: object) -> JobDocument:
    values: dict[str, object] = {
        "job_id": job_id,
        "delivery_id": uuid.uuid4().hex,
        "attempt": 1,
        "name": f"job-{job_id}",
        "owner": "alice",
        "client": "web-17",
        "privilege": "run",
        "priority": 0,
        "timeout": 60,
        "output_limit": 1024,
        "interpreter": "/bin/sh",
        "created": CREATED,
        "script": "echo hello\n",
    }
    values.update(changes)
    return JobDocument(**values)  # type: ignore[arg-type]


def add(spool: Spool, doc: JobDocument) -> bool:
    return spool.add(documents.render_job(doc), doc)


def finished_xml(doc: JobDocument, state: str = "succeeded") -> str:
    report = StatusReport(
        job_id=doc.job_id, delivery_id=doc.delivery_id, state=state, exit_code=0, output="hi"
    )
    return documents.render_status(report)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_add_writes_the_job_then_the_journal(spool: Spool) -> None:
    doc = make_job(42)
    assert add(spool, doc) is True
    entry = spool.get(42)
    assert entry is not None
    assert entry.state == spool_module.RECEIVED
    assert entry.delivery_id == doc.delivery_id
    assert (entry.path / "job.xml").read_text(encoding="utf-8") == documents.render_job(doc)
    assert spool.job(42) == doc
    assert spool.held_ids() == [42]
    assert spool.running_ids() == []
    # No temporary files are left behind by the atomic writes.
    assert sorted(p.name for p in entry.path.iterdir()) == ["job.xml", "state"]


def test_a_duplicate_delivery_is_refused_in_every_state(spool: Spool) -> None:
    doc = make_job(7)
    assert add(spool, doc)
    assert not add(spool, doc)
    spool.mark_started(7, dead_pid())
    assert not add(spool, doc)
    spool.mark_finished(7, finished_xml(doc))
    assert not add(spool, doc)
    spool.mark_reported(7)
    assert not add(spool, doc)
    assert spool.runnable() == []
    # A fresh Spool reads the same journal from disk.
    reloaded = Spool(spool.root)
    assert not add(reloaded, doc)
    assert reloaded.get(7) is not None and reloaded.get(7).state == spool_module.REPORTED  # type: ignore[union-attr]


def test_a_new_delivery_of_a_reported_job_requeues_its_result(spool: Spool) -> None:
    doc = make_job(8)
    add(spool, doc)
    spool.mark_finished(8, finished_xml(doc))
    spool.mark_reported(8)
    redelivered = make_job(8)
    assert not add(spool, redelivered)
    [(job_id, xml)] = spool.pending_reports()
    assert job_id == 8
    report = documents.parse_status(xml)
    assert report.delivery_id == redelivered.delivery_id
    assert report.state == "succeeded"
    assert spool.runnable() == []


def test_an_operators_retry_of_an_ended_run_spools_it_afresh(spool: Spool) -> None:
    doc = make_job(8)
    add(spool, doc)
    spool.mark_finished(8, finished_xml(doc, "failed"))
    spool.mark_reported(8)
    retried = make_job(8, attempt=2, retry_base=1)
    assert add(spool, retried)
    assert spool.pending_reports() == []
    assert [e.job_id for e in spool.runnable()] == [8]
    # A lease re-sent within the retried run is a repeat again, as before.
    assert not add(spool, make_job(8, attempt=3, retry_base=1))
    # A retry of a run that has not ended here adopts the delivery: never two runs.
    running = make_job(9)
    add(spool, running)
    spool.mark_started(9, dead_pid())
    assert not add(spool, make_job(9, attempt=2, retry_base=1))
    assert spool.running_ids() == [9]


def test_runnable_order_is_priority_then_age_then_id(spool: Spool) -> None:
    later = CREATED + dt.timedelta(minutes=5)
    add(spool, make_job(5, priority=0, created=CREATED))
    add(spool, make_job(4, priority=10, created=later))
    add(spool, make_job(3, priority=10, created=CREATED))
    add(spool, make_job(2, priority=0, created=CREATED))
    add(spool, make_job(1, priority=-5, created=CREATED))
    assert [e.job_id for e in spool.runnable()] == [3, 4, 2, 5, 1]


def test_started_finished_reported(spool: Spool) -> None:
    doc = make_job(9)
    add(spool, doc)
    spool.mark_started(9, dead_pid())
    assert spool.running_ids() == [9]
    assert spool.held_ids() == []
    assert spool.runnable() == []
    spool.mark_finished(9, finished_xml(doc))
    assert spool.pending_reports() == [(9, finished_xml(doc))]
    spool.mark_reported(9)
    assert spool.pending_reports() == []


def test_drop_makes_a_tombstone_that_never_runs(spool: Spool) -> None:
    doc = make_job(11)
    add(spool, doc)
    assert spool.drop(11, "unknown to the server")
    assert spool.runnable() == [] and spool.held_ids() == []
    assert spool.pending_reports() == []
    assert spool.cancel_reason(11) == "unknown to the server"
    assert not add(spool, doc)
    assert not spool.drop(11, "again")


def test_drop_with_a_report_queues_it(spool: Spool) -> None:
    doc = make_job(12)
    add(spool, doc)
    report = StatusReport(job_id=12, delivery_id=doc.delivery_id, state="cancelled", reason="x")
    assert spool.drop(12, "x", documents.render_status(report))
    [(job_id, xml)] = spool.pending_reports()
    assert job_id == 12 and documents.parse_status(xml).state == "cancelled"


def test_recover_fails_a_job_that_was_running_when_the_agent_died(spool: Spool) -> None:
    doc = make_job(20)
    add(spool, doc)
    spool.mark_started(20, dead_pid())
    (spool.root / "20" / "output").write_bytes(b"partial output\n")
    crashed = Spool(spool.root)  # what a restarted agent sees
    assert agent.recover(crashed, kill_grace=1) == [20]
    [(job_id, xml)] = crashed.pending_reports()
    report = documents.parse_status(xml)
    assert (job_id, report.state, report.reason) == (20, "failed", "agent restarted")
    assert report.delivery_id == doc.delivery_id
    assert report.output == "partial output\n"
    assert report.started is not None and report.finished is not None


def test_recover_reruns_a_job_that_allows_it(spool: Spool) -> None:
    add(spool, make_job(21, rerun_on_agent_crash=True))
    spool.mark_started(21, dead_pid())
    crashed = Spool(spool.root)
    agent.recover(crashed, kill_grace=1)
    assert [e.job_id for e in crashed.runnable()] == [21]
    assert crashed.pending_reports() == []


def test_recover_keeps_a_result_written_just_before_the_crash(spool: Spool) -> None:
    doc = make_job(22)
    add(spool, doc)
    spool.mark_started(22, dead_pid())
    # The crash came between result.xml and the journal saying finished.
    spool_module.write_atomic(spool.root / "22" / "result.xml", finished_xml(doc).encode())
    crashed = Spool(spool.root)
    agent.recover(crashed, kill_grace=1)
    assert crashed.pending_reports() == [(22, finished_xml(doc))]


def test_recover_kills_the_orphaned_process_group(spool: Spool) -> None:
    add(spool, make_job(23))
    orphan = subprocess.Popen(["sleep", "30"], start_new_session=True)
    # The test process is its parent; reap it as init would for a dead agent.
    reaper = threading.Thread(target=orphan.wait, daemon=True)
    reaper.start()
    spool.mark_started(23, orphan.pid)
    began = time.monotonic()
    agent.recover(Spool(spool.root), kill_grace=2)
    reaper.join(timeout=5)
    assert orphan.returncode is not None and orphan.returncode < 0
    assert time.monotonic() - began < 2
    with pytest.raises(ProcessLookupError):
        os.killpg(orphan.pid, 0)


def test_recover_removes_an_entry_that_was_never_committed(spool: Spool) -> None:
    add(spool, make_job(30))
    half = spool.root / "31"
    half.mkdir()
    (half / "job.xml").write_text("<job/>")
    agent.recover(Spool(spool.root), kill_grace=1)
    assert not half.exists()
    assert (spool.root / "30").exists()


def test_purge_removes_only_old_tombstones(spool: Spool) -> None:
    for job_id in (40, 41):
        doc = make_job(job_id)
        add(spool, doc)
        spool.mark_finished(job_id, finished_xml(doc))
    spool.mark_reported(40)
    assert spool.purge(older_than=3600) == 0
    time.sleep(0.01)
    assert spool.purge(older_than=0) == 1
    assert not (spool.root / "40").exists()
    assert spool.get(40) is None
    assert [job_id for job_id, _ in spool.pending_reports()] == [41]


def test_a_damaged_entry_is_left_alone_and_never_run(spool: Spool) -> None:
    doc = make_job(50)
    add(spool, doc)
    (spool.root / "50" / "state").write_text("{not json")
    reloaded = Spool(spool.root)
    assert reloaded.entries() == []
    assert not add(reloaded, doc)
    assert reloaded.runnable() == []
    assert (spool.root / "50" / "state").read_text() == "{not json"
