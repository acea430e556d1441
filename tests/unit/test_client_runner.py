"""The job runner on real processes: exit codes, timeouts, kills, output cap."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scire_client import runner
from scire_schema.documents import JobDocument, StatusReport


def make_job(script: str, **changes: object) -> JobDocument:
    values: dict[str, object] = {
        "job_id": 42,
        "delivery_id": uuid.uuid4().hex,
        "attempt": 1,
        "name": "backup",
        "owner": "alice",
        "client": "web-17",
        "privilege": "run",
        "priority": 0,
        "timeout": 60,
        "output_limit": 64 * 1024,
        "interpreter": "/bin/sh",
        "created": dt.datetime(2024, 1, 1),
        "script": script,
    }
    values.update(changes)
    return JobDocument(**values)  # type: ignore[arg-type]


def own_setup(tmp_path: Path) -> runner.JobSetup:
    """Jobs as the test's own user, their trees under ``tmp_path/work``."""
    setup = runner.JobSetup(user=runner.JobUser.resolve(""), work_root=tmp_path / "work")
    runner.prepare_work_root(setup)
    return setup


def run(
    tmp_path: Path,
    doc: JobDocument,
    *,
    kill_grace: float = 2.0,
    tick_interval: float = 10.0,
    cancel_after: float | None = None,
) -> StatusReport:
    began = time.monotonic()

    def on_tick() -> bool:
        return cancel_after is not None and time.monotonic() - began >= cancel_after

    return runner.run_job(
        doc,
        tmp_path,
        setup=own_setup(tmp_path),
        delivery_id=doc.delivery_id,
        kill_grace=kill_grace,
        tick_interval=tick_interval,
        on_started=lambda mark: None,
        on_tick=on_tick,
    )


def test_success_captures_stdout_and_stderr_in_order(tmp_path: Path) -> None:
    script = 'echo "job $SCIRE_JOB_ID delivery $SCIRE_DELIVERY_ID"\necho oops >&2\necho done\n'
    doc = make_job(script)
    report = run(tmp_path, doc)
    assert report.state == "succeeded"
    assert report.exit_code == 0
    assert report.output == f"job 42 delivery {doc.delivery_id}\noops\ndone\n"
    assert report.truncated is False
    assert report.job_id == 42 and report.delivery_id == doc.delivery_id
    assert report.started is not None and report.finished is not None
    assert report.started <= report.finished
    assert (tmp_path / "script").read_text() == script


def test_the_job_runs_in_a_fresh_work_dir_with_no_stdin(tmp_path: Path) -> None:
    report = run(tmp_path, make_job("pwd\nls -A\ncat\necho end\n"))
    assert report.state == "succeeded"
    assert report.output == f"{tmp_path / 'work' / '42' / 'work'}\nend\n"
    assert not (tmp_path / "work" / "42").exists()  # removed after the job


def test_failure_keeps_the_exit_code(tmp_path: Path) -> None:
    report = run(tmp_path, make_job("echo failing\nexit 3\n"))
    assert (report.state, report.exit_code, report.output) == ("failed", 3, "failing\n")


def test_a_missing_interpreter_fails_with_127(tmp_path: Path) -> None:
    report = run(tmp_path, make_job("echo hi\n", interpreter="/nonexistent/interpreter"))
    assert (report.state, report.exit_code) == ("failed", 127)


def test_another_interpreter(tmp_path: Path) -> None:
    report = run(tmp_path, make_job("import sys\nprint(sys.argv[0])\n", interpreter=sys.executable))
    assert report.state == "succeeded"
    assert report.output == f"{tmp_path / 'work' / '42' / 'script'}\n"


def test_death_by_signal_is_128_plus_the_signal(tmp_path: Path) -> None:
    report = run(tmp_path, make_job("kill -KILL $$\n"))
    assert (report.state, report.exit_code) == ("failed", 137)
    assert report.reason == "killed by signal 9 (SIGKILL)"


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    began = time.monotonic()
    report = run(tmp_path, make_job("echo before\nsleep 30 &\nsleep 30\n", timeout=1))
    assert time.monotonic() - began < 4
    assert report.state == "timed_out"
    assert report.reason == "timed out after 1 s"
    assert report.output == "before\n"


def test_a_job_ignoring_sigterm_gets_sigkill(tmp_path: Path) -> None:
    began = time.monotonic()
    report = run(tmp_path, make_job("trap '' TERM\nsleep 30\n", timeout=1), kill_grace=0.5)
    elapsed = time.monotonic() - began
    assert 1.4 <= elapsed < 4
    assert report.state == "timed_out"
    assert report.exit_code == 137


def test_output_beyond_the_limit_is_cut(tmp_path: Path) -> None:
    doc = make_job("i=0\nwhile [ $i -lt 100 ]; do echo 0123456789; i=$((i+1)); done\n")
    report = run(tmp_path, JobDocument(**{**doc.__dict__, "output_limit": 25}))
    assert report.state == "succeeded"
    assert report.output == "0123456789\n0123456789\n012"
    assert report.truncated is True
    exact = run(tmp_path, JobDocument(**{**doc.__dict__, "output_limit": 1100}))
    assert exact.truncated is False and len(exact.output or "") == 1100


def test_output_that_is_not_utf8_is_replaced(tmp_path: Path) -> None:
    report = run(tmp_path, make_job("printf 'a\\377b'\n"))
    assert report.output == "a\ufffdb"


def test_cancel_from_a_heartbeat_stops_the_job(tmp_path: Path) -> None:
    began = time.monotonic()
    report = run(tmp_path, make_job("sleep 30\n"), tick_interval=0.2, cancel_after=0.3)
    assert time.monotonic() - began < 3
    assert report.state == "cancelled"
    assert report.reason == runner.CANCELLED_REASON


def test_started_is_recorded_before_the_script_runs(tmp_path: Path) -> None:
    seen: list[tuple[int, bool]] = []

    def on_started(mark: runner.ProcessMark) -> None:
        time.sleep(0.2)  # were the script not gated, it would have run by now
        seen.append((mark.pgid, (tmp_path / "work" / "42" / "work" / "ran").exists()))

    report = runner.run_job(
        make_job("touch ran\necho $$\n"),
        tmp_path,
        setup=own_setup(tmp_path),
        delivery_id=uuid.uuid4().hex,
        kill_grace=1,
        tick_interval=10,
        on_started=on_started,
        on_tick=lambda: False,
    )
    assert report.state == "succeeded"
    [(pgid, ran_early)] = seen
    assert ran_early is False
    assert report.output == f"{pgid}\n"  # the script is the process group leader


def test_a_failing_on_started_never_runs_the_script(tmp_path: Path) -> None:
    def on_started(mark: runner.ProcessMark) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_with(tmp_path, make_job(f"touch {tmp_path}/ran\n"), on_started)
    time.sleep(0.1)
    assert not (tmp_path / "ran").exists()


def run_with(tmp_path: Path, doc: JobDocument, on_started: object) -> StatusReport:
    return runner.run_job(
        doc,
        tmp_path,
        setup=own_setup(tmp_path),
        delivery_id=doc.delivery_id,
        kill_grace=1,
        tick_interval=10,
        on_started=on_started,  # type: ignore[arg-type]
        on_tick=lambda: False,
    )


def test_live_output_holds_back_a_cut_utf8_sequence(tmp_path: Path) -> None:
    path = tmp_path / "output"
    path.write_bytes(b"ok \xc3")  # the first byte of "é": the rest is not written yet
    assert runner.read_live_output(path, 100) == ("ok ", False)
    path.write_bytes("ok é".encode())
    assert runner.read_live_output(path, 100) == ("ok é", False)
    # Over the limit: the cap holds, marked truncated, and a cut sequence shows as U+FFFD.
    assert runner.read_live_output(path, 4) == ("ok \ufffd", True)
    assert runner.read_live_output(tmp_path / "none", 10) == ("", False)


def test_read_output_of_a_missing_file(tmp_path: Path) -> None:
    assert runner.read_output(tmp_path / "none", 10) == ("", False)
    assert os.path.exists(tmp_path)


@pytest.fixture
def orphan() -> Iterator[subprocess.Popen[bytes]]:
    """A process group of its own, as a job left by a dead agent."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    yield proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_leftover_kills_the_jobs_group(orphan: subprocess.Popen[bytes]) -> None:
    mark = runner.ProcessMark.take(orphan.pid)
    assert mark.boot_id is not None and mark.leader_start is not None
    # The test process is its parent; reap it as init would for a dead agent.
    reaper = threading.Thread(target=orphan.wait, daemon=True)
    reaper.start()
    runner.kill_leftover(mark, kill_grace=5, what="job 1")
    reaper.join(timeout=10)
    assert orphan.returncode == -signal.SIGTERM


def test_kill_leftover_spares_a_group_from_another_boot(orphan: subprocess.Popen[bytes]) -> None:
    mark = dataclasses.replace(runner.ProcessMark.take(orphan.pid), boot_id="another boot")
    assert not mark.still_ours()
    runner.kill_leftover(mark, kill_grace=1, what="job 1")
    assert orphan.poll() is None


def test_kill_leftover_spares_a_reused_pid(orphan: subprocess.Popen[bytes]) -> None:
    taken = runner.ProcessMark.take(orphan.pid)
    assert taken.leader_start is not None
    mark = dataclasses.replace(taken, leader_start=taken.leader_start - 1)
    assert not mark.still_ours()
    runner.kill_leftover(mark, kill_grace=1, what="job 1")
    assert orphan.poll() is None


@pytest.mark.parametrize(
    ("script", "command"),
    [
        ("#!/usr/bin/env python3\nprint(1)\n", ["/usr/bin/env", "python3"]),
        ("#!/bin/sh\r\necho crlf\r\n", ["/bin/sh"]),
        ("#! /bin/bash -eu -o pipefail\n", ["/bin/bash", "-eu -o pipefail"]),
        ("#!/bin/sh\t-e  \n", ["/bin/sh", "-e"]),
    ],
)
def test_without_an_interpreter_the_shebang_line_says_what_runs(
    script: str, command: list[str]
) -> None:
    assert runner.job_command(make_job(script, interpreter="")) == command


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ("echo no shebang\n", "has no #! line"),
        ("#!\necho\n", "names no interpreter"),
        ("#!python3\n", "'python3', not an absolute path"),
    ],
)
def test_a_shebang_line_that_cannot_run_fails_the_job_with_the_reason(
    tmp_path: Path, script: str, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        runner.job_command(make_job(script, interpreter=""))
    report = run(tmp_path, make_job(script, interpreter=""))
    assert report.state == "failed"
    assert report.reason is not None and why in report.reason


def test_an_interpreter_given_wins_over_the_shebang_line() -> None:
    assert runner.job_command(make_job("#!/usr/bin/python3\n", interpreter="/bin/sh")) == [
        "/bin/sh"
    ]
