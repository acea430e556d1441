"""Runs one job as its own process: timeout, output cap, kill, and its end recorded.

The runner owns the job's process group, in this agent's life and after it:
nothing else signals one.

The job runs as ``interpreter script`` (or, with no interpreter, as its
``#!`` line says: ``job_command``) in a process group of its own (so the
whole group can be signalled, and it survives an agent crash), with stdin from
/dev/null and stdout and stderr into one file. Its parent is not the agent but
``jobwrapper``, started in a session of its own, which records the job's exit
status in the spool entry (``EXIT_RECORD``) when it ends: a restarted agent
reads it, or re-attaches to a job whose wrapper still runs (``attach_job``).

Each job gets a tree of its own, ``work_root/<job id>/``: ``script``, the
working directory ``work/`` and ``TMPDIR`` ``tmp/``, made fresh before the job
and removed after it. The job runs as ``JobUser`` (the agent's own user, or
``run_as`` when the agent is root: set by the wrapper in the child, after
``fork`` and before ``exec``), with exactly the environment ``job_environment``
builds; the spool stays the agent's own (mode 0700), and the job writes its
output through the file descriptor it inherits.

A gate makes "started is on disk before the job runs" exact: the job is first
a ``/bin/sh`` that waits for one line on its stdin, a pipe only the runner can
write. The wrapper spawns it and tells the runner its pid; the runner hands its
``ProcessMark`` (process group id, boot, leader start time, the wrapper's pid
and start time) to ``on_started`` -- which journals it -- and only then writes
the go-ahead; the shell swaps stdin for /dev/null and execs the interpreter in
the same process. If the agent dies before the go-ahead, the shell reads
end-of-file and exits without running anything.

``JobRun.check`` never blocks, so the daemon watches many runs at once;
``run_job`` and ``wait_job`` wait for one, with heartbeats, for normal mode.
"""

from __future__ import annotations

import codecs
import datetime as dt
import json
import logging
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scire_client import jobwrapper
from scire_schema.documents import JobDocument, StatusReport
from scire_schema.files import write_atomic
from scire_schema.protocol import parse_time, utc_now

log = logging.getLogger(__name__)

SCRIPT_FILE = "script"
OUTPUT_FILE = "output"
WAIT_STEP = 0.1  # seconds between checks of the process, the timeout and the heartbeat
GATE_EXIT = jobwrapper.GATE_EXIT
EXIT_RECORD = jobwrapper.EXIT_RECORD
WRAPPER_START_TIMEOUT = 30.0  # seconds for the wrapper to start and spawn the job
_GO = b"go\n"

CANCELLED_REASON = "cancelled by the server"
#: When neither the agent nor the job's wrapper can tell how a started job ended.
AGENT_RESTARTED_REASON = "agent restarted"
#: The job's PATH, whatever the agent's is.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Variables ``job_environment`` and ``pass_environment`` may set over the defaults;
#: every other variable the runner sets is Scire's.
OVERRIDABLE = frozenset({"PATH", "LANG"})
RESERVED_PREFIX = "SCIRE_"
WORK_DIR = "work"
TMP_DIR = "tmp"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_KILL_POLL = 0.05  # seconds between checks that a leftover process group is gone


@dataclass(frozen=True)
class JobUser:
    """Who a job runs as: the agent's own user, or another when the agent is root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  #: supplementary groups, set only when ``switch``
    home: str = ""
    switch: bool = False  #: the child must change to this user before it execs

    @classmethod
    def resolve(cls, run_as: str) -> JobUser:
        """The user ``run_as`` names ("" = the agent's own); ``ValueError`` when the
        user does not exist, or is another user and the agent is not root."""
        euid = os.geteuid()
        if not run_as:
            try:
                me = pwd.getpwuid(euid)
            except KeyError:  # a uid without a passwd entry (containers)
                return cls(str(euid), euid, os.getegid())
            return cls(me.pw_name, euid, os.getegid(), home=me.pw_dir)
        try:
            entry = pwd.getpwuid(int(run_as)) if run_as.isdigit() else pwd.getpwnam(run_as)
        except KeyError:
            raise ValueError(f"run_as {run_as!r}: no such user") from None
        if entry.pw_uid == euid:
            return cls(entry.pw_name, euid, os.getegid(), home=entry.pw_dir)
        if euid != 0:
            raise ValueError(
                f"run_as {run_as!r}: the agent runs as uid {euid}, not root, so it cannot "
                "run jobs as another user (run the agent as root, or leave run_as unset)"
            )
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir, switch=True)


@dataclass(frozen=True)
class JobSetup:
    """How every job of this agent runs: as whom, where, with which extra variables."""

    user: JobUser
    work_root: Path  #: each job's tree is ``work_root/<job id>``, owned by the agent
    extra_environment: Mapping[str, str] = field(default_factory=dict)
    server: str = ""  #: the URL the jobs came from (``SCIRE_SERVER``)


def prepare_work_root(setup: JobSetup) -> None:
    """Make ``work_root`` (or check it) at start-up; ``ValueError`` says why not.

    Only the agent may write it: a job's tree is made in it by the agent as
    root, so a directory others could write would let them plant links there.
    Another run-as user needs to search it and every directory above it.
    """
    root = setup.work_root
    root.mkdir(parents=True, exist_ok=True, mode=0o711 if setup.user.switch else 0o700)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"work_root {root} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ValueError(
            f"work_root {root} must belong to the agent's user and be writable by it only "
            f"(it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})"
        )
    if not setup.user.switch:
        return
    if not info.st_mode & stat.S_IXOTH:
        os.chmod(root, stat.S_IMODE(info.st_mode) | 0o011)
    for directory in (root, *root.parents):
        if not _may_search(directory.stat(), setup.user):
            raise ValueError(
                f"run_as {setup.user.name}: {setup.user.name} cannot reach work_root {root}: "
                f"it may not enter {directory}; set work_root to a directory every parent "
                f"of which {setup.user.name} may enter (e.g. /var/lib/scire-work)"
            )


def _may_search(info: os.stat_result, user: JobUser) -> bool:
    # Mode bits only: a POSIX ACL that grants more is not seen, one that denies is.
    if info.st_uid == user.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == user.gid or info.st_gid in user.groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def job_environment(
    doc: JobDocument, delivery_id: str, setup: JobSetup, tree: Path
) -> dict[str, str]:
    """The job's whole environment (documented in docs/ARCHITECTURE.md, "The job's process")."""
    user = setup.user
    home = user.home if user.home and os.path.isdir(user.home) else str(tree / WORK_DIR)
    env = {
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
        "HOME": home,
        "USER": user.name,
        "LOGNAME": user.name,
        "TMPDIR": str(tree / TMP_DIR),
        "SCIRE_JOB_ID": str(doc.job_id),
        "SCIRE_DELIVERY_ID": delivery_id,
        "SCIRE_JOB_NAME": doc.name,
        "SCIRE_ATTEMPT": str(doc.attempt),
        "SCIRE_OWNER": doc.owner,
        "SCIRE_CLIENT": doc.client,
    }
    if setup.server:
        env["SCIRE_SERVER"] = setup.server
    for name, value in setup.extra_environment.items():
        if name in env and name not in OVERRIDABLE:
            continue  # the configuration refuses these; never let one through
        env[name] = value
    return env


def job_tree(work_root: Path, job_id: int) -> Path:
    return work_root / str(job_id)


def remove_job_tree(work_root: Path, job_id: int) -> None:
    """Remove a job's tree, whatever the job left in it."""
    tree = job_tree(work_root, job_id)
    if tree.is_symlink():
        tree.unlink()
    elif tree.exists():
        shutil.rmtree(tree)


#: The longest shebang line read, as Linux reads it (``BINPRM_BUF_SIZE``).
SHEBANG_MAX = 256


def job_command(doc: JobDocument) -> list[str]:
    """What runs the script (its path is added last): the job's interpreter,
    or without one the script's ``#!`` line as the kernel reads it -- the
    interpreter and at most one argument, the rest of the line. The line is
    run that way, not the script executed, so a work root mounted ``noexec``
    runs it too. ``ValueError`` says why a shebang line cannot be run."""
    if doc.interpreter:
        return [doc.interpreter]
    first = doc.script.split("\n", 1)[0]
    if not first.startswith("#!"):
        raise ValueError("the job names no interpreter and the script has no #! line")
    line = first[2:SHEBANG_MAX].strip()
    if not line:
        raise ValueError("the script's #! line names no interpreter")
    interpreter, *argument = re.split(r"[ \t]+", line, maxsplit=1)
    if not interpreter.startswith("/"):
        raise ValueError(f"the script's #! line names {interpreter!r}, not an absolute path")
    return [interpreter, *argument]


def _make_job_tree(setup: JobSetup, doc: JobDocument) -> Path:
    """A fresh tree for ``doc``: everything made by the agent first, then handed to
    the job's user, the tree itself last, so the job user never holds a directory
    the agent still writes in."""
    tree = job_tree(setup.work_root, doc.job_id)
    remove_job_tree(setup.work_root, doc.job_id)  # what a crashed run left
    os.mkdir(tree, 0o700)
    made = [tree / WORK_DIR, tree / TMP_DIR, tree / SCRIPT_FILE]
    os.mkdir(made[0], 0o700)
    os.mkdir(made[1], 0o700)
    fd = os.open(made[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(doc.script.encode("utf-8"))
    if setup.user.switch:
        for path in (*made, tree):
            os.chown(path, setup.user.uid, setup.user.gid, follow_symlinks=False)
    return tree


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
    #: The job's wrapper (``jobwrapper``), its parent, and its start time; None for a
    #: job an older agent started without one.
    wrapper_pid: int | None = None
    wrapper_start: int | None = None

    @classmethod
    def take(cls, pgid: int, wrapper_pid: int | None = None) -> ProcessMark:
        """The mark of the live group ``pgid`` (and its wrapper), read while its leader runs."""
        wrapper_start = _process_start(wrapper_pid) if wrapper_pid is not None else None
        return cls(pgid, _boot_id(), _process_start(pgid), wrapper_pid, wrapper_start)

    def wrapper_alive(self) -> bool:
        """True while the wrapper that will record the job's end provably still runs."""
        if self.wrapper_pid is None or self.wrapper_start is None:
            return False
        if self.boot_id is not None and self.boot_id != _boot_id():
            return False
        return _process_start(self.wrapper_pid, live_only=True) == self.wrapper_start

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


def _read_head(path: Path, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of ``path`` (none when it is missing), and whether there was more."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit), bool(fh.read(1))
    except FileNotFoundError:
        return b"", False


def read_output(path: Path, limit: int) -> tuple[str, bool]:
    """The first ``limit`` bytes of ``path`` as text, and whether there was more."""
    data, truncated = _read_head(path, limit)
    return data.decode("utf-8", errors="replace"), truncated


def read_live_output(path: Path, limit: int) -> tuple[str, bool]:
    """``read_output`` for a job still writing: a UTF-8 sequence cut at the end
    is held back (it is whole in the next read), not turned into U+FFFD."""
    data, truncated = _read_head(path, limit)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(data, final=truncated), truncated


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


def _process_start(pid: int, *, live_only: bool = False) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22);
    with ``live_only``, None for a zombie too (it has exited; nobody reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if live_only and fields[0] in ("Z", "X"):
        return None
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


@dataclass(frozen=True)
class ExitRecord:
    """How a job ended, as its wrapper wrote it into the spool entry."""

    exit_status: int  #: as ``Popen.returncode``: -N when a signal N killed it
    finished: dt.datetime


def read_exit_record(entry_dir: Path, wrapper_pid: int | None) -> ExitRecord | None:
    """The wrapper's record of this run (``wrapper_pid``'s), or None when there is none
    yet; one left by another run, or damaged, counts as none."""
    try:
        data = json.loads((entry_dir / EXIT_RECORD).read_text(encoding="utf-8"))
        status, pid = data["exit_status"], data["wrapper_pid"]
        finished = parse_time(data["finished_at"]).replace(tzinfo=dt.UTC)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("%s: damaged exit record, ignoring it: %s", entry_dir / EXIT_RECORD, exc)
        return None
    if type(status) is not int or pid != wrapper_pid:
        return None
    return ExitRecord(status, finished)


class JobRun:
    """One job's run: started by this agent (``start_job``) or re-attached after an
    agent restart (``attach_job``).

    ``check()`` never blocks: it enforces the timeout and returns the final
    report once the job has ended (and removes the job's tree), else None.
    ``stop()`` asks the job to end: SIGTERM to its process group now, SIGKILL
    after ``kill_grace`` from a later ``check()``. Only the job's own group is
    ever signalled, and only while ``ProcessMark.still_ours`` says it is.
    """

    def __init__(
        self,
        doc: JobDocument,
        entry_dir: Path,
        delivery_id: str,
        *,
        mark: ProcessMark,
        started: dt.datetime,
        deadline: float,
        kill_grace: float,
        work_root: Path,
        proc: subprocess.Popen[bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.doc = doc
        self.entry_dir = entry_dir
        self.delivery_id = delivery_id
        self.mark = mark
        self.started = started
        self.deadline = deadline
        self.kill_grace = kill_grace
        self.work_root = work_root
        self._proc = proc  # the wrapper, when it is our child
        self._clock = clock
        self._forced: tuple[str, str] | None = None
        self._kill_at: float | None = None

    @property
    def job_id(self) -> int:
        return self.doc.job_id

    @property
    def attached(self) -> bool:
        """True for a run another agent process started."""
        return self._proc is None

    def check(self) -> StatusReport | None:
        now = self._clock()
        if self._forced is None and now >= self.deadline:
            log.warning(
                "job %s (%s): timed out after %s s",
                self.doc.job_id,
                self.doc.name,
                self.doc.timeout,
            )
            self.stop("timed_out", f"timed out after {self.doc.timeout} s")
        elif self._kill_at is not None and now >= self._kill_at:
            log.warning(
                "job %s (%s): process group %s ignored SIGTERM for %s s: SIGKILL",
                self.doc.job_id,
                self.doc.name,
                self.mark.pgid,
                self.kill_grace,
            )
            self._kill_at = None
            self._signal(signal.SIGKILL)
        if not self._ended():
            return None
        return self._finish()

    def stop(self, state: str, reason: str) -> None:
        """End the job as ``state`` (``timed_out``, ``cancelled``, ``failed``) for ``reason``."""
        if self._forced is not None:
            return
        self._forced = (state, reason)
        self._signal(signal.SIGTERM)
        self._kill_at = self._clock() + self.kill_grace

    def output_so_far(self) -> tuple[str, bool]:
        """What the job has written up to now (at most its output limit), and
        whether it wrote more than the limit."""
        return read_live_output(self.entry_dir / OUTPUT_FILE, self.doc.output_limit)

    def kill(self) -> None:
        """SIGKILL the job's group at once (the agent goes down, or its grace ran out)."""
        self._signal(signal.SIGKILL)

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on a thread of its own) once the job's wrapper, our
        child, has exited; nothing for a re-attached run, which ``check`` finds."""
        proc = self._proc
        if proc is None:
            return

        def watch() -> None:
            proc.wait()
            callback()

        threading.Thread(target=watch, name=f"job-{self.job_id}-end", daemon=True).start()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less when the job ends first."""
        if self._proc is None:
            time.sleep(timeout)
            return
        try:
            self._proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, sig: signal.Signals) -> None:
        if self.mark.still_ours():
            _signal_group(self.mark.pgid, sig)

    def _ended(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is not None
        if read_exit_record(self.entry_dir, self.mark.wrapper_pid) is not None:
            return True
        return not self.mark.wrapper_alive()

    def _finish(self) -> StatusReport:
        record = read_exit_record(self.entry_dir, self.mark.wrapper_pid)
        state, reason = self._forced or (None, None)
        if self._forced is not None:
            # Children that outlived the leader (or ignored SIGTERM) go too.
            self._signal(signal.SIGKILL)
        code: int | None = None
        finished = utc_now()
        if record is not None:
            code, finished = record.exit_status, record.finished
        elif self._proc is not None:
            reason = reason or (
                f"the job's wrapper ended (status {self._proc.returncode}) "
                "without recording the job's exit status"
            )
        else:
            # Its wrapper is gone and left no record: how the job ended is unknown.
            self._signal(signal.SIGKILL)
            reason = reason or AGENT_RESTARTED_REASON
        if code is not None and code < 0:
            # Shells report death by signal N as 128 + N; the reason names the signal.
            signame = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            reason = reason or f"killed by signal {-code} ({signame})"
            code = 128 - code
        if state is None:
            state = "succeeded" if code == 0 else "failed"
        output, truncated = read_output(self.entry_dir / OUTPUT_FILE, self.doc.output_limit)
        try:
            remove_job_tree(self.work_root, self.doc.job_id)
        except OSError as exc:
            log.error(
                "job %s (%s): cannot remove its tree: %s", self.doc.job_id, self.doc.name, exc
            )
        return _report(
            self.doc,
            self.delivery_id,
            state,
            self.started,
            finished,
            code,
            reason,
            output,
            truncated,
        )


def start_job(
    doc: JobDocument,
    entry_dir: Path,
    *,
    setup: JobSetup,
    delivery_id: str,
    kill_grace: float,
    on_started: Callable[[ProcessMark], None],
    clock: Callable[[], float] = time.monotonic,
) -> JobRun | StatusReport:
    """Start ``doc`` in a fresh tree under ``setup.work_root``, its output into
    ``entry_dir``: its ``JobRun``, or the final report when it could not start.

    ``on_started(mark)`` runs after the spawn and before the script may start;
    when it raises, the job is killed and the exception goes on.
    """
    # The spool's copy: the script as run, for whoever looks into the entry later.
    write_atomic(entry_dir / SCRIPT_FILE, doc.script.encode("utf-8"))
    (entry_dir / EXIT_RECORD).unlink(missing_ok=True)  # a record of an earlier, aborted start
    started = utc_now()
    try:
        command = job_command(doc)
    except ValueError as exc:
        return _report(doc, delivery_id, "failed", started, reason=f"cannot start: {exc}")
    try:
        tree = _make_job_tree(setup, doc)
    except OSError as exc:
        reason = f"cannot make the job's directory: {exc}"
        return _report(doc, delivery_id, "failed", started, reason=reason)
    env = job_environment(doc, delivery_id, setup, tree)
    user = setup.user
    gate_read, gate_write = os.pipe()
    pid_read, pid_write = os.pipe()
    try:
        with open(entry_dir / OUTPUT_FILE, "wb") as output:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-m",
                    jobwrapper.__name__,
                    str(entry_dir / EXIT_RECORD),
                    str(pid_write),
                    str(user.uid) if user.switch else jobwrapper.SAME_USER,
                    str(user.gid),
                    ",".join(str(g) for g in user.groups),
                    *command,
                    str(tree / SCRIPT_FILE),
                ],
                stdin=gate_read,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=tree / WORK_DIR,
                env=env,
                start_new_session=True,
                pass_fds=(pid_write,),
            )
    except OSError as exc:
        for fd in (gate_write, pid_read):
            os.close(fd)
        remove_job_tree(setup.work_root, doc.job_id)
        return _report(doc, delivery_id, "failed", started, reason=f"cannot start: {exc}")
    finally:
        os.close(gate_read)
        os.close(pid_write)
    answer = _read_line(pid_read, WRAPPER_START_TIMEOUT)
    if not answer.isdigit():
        os.close(gate_write)
        _signal_group(proc.pid, signal.SIGKILL)  # our child, not yet reaped: still its group
        proc.wait()
        remove_job_tree(setup.work_root, doc.job_id)
        why = answer.removeprefix("error ") or "the job's wrapper did not start"
        return _report(doc, delivery_id, "failed", started, reason=f"cannot start: {why}")
    mark = ProcessMark.take(int(answer), proc.pid)
    with os.fdopen(gate_write, "wb") as gate:
        try:
            on_started(mark)
        except BaseException:
            _signal_group(mark.pgid, signal.SIGKILL)
            proc.wait()
            raise
        try:
            gate.write(_GO)
        except BrokenPipeError:
            pass  # the gate died; its exit status tells the rest
    log.debug(
        "job %s (%s): process group %s started as %s",
        doc.job_id,
        doc.name,
        mark.pgid,
        setup.user.name,
    )
    return JobRun(
        doc,
        entry_dir,
        delivery_id,
        mark=mark,
        started=started,
        deadline=clock() + doc.timeout,
        kill_grace=kill_grace,
        work_root=setup.work_root,
        proc=proc,
        clock=clock,
    )


def attach_job(
    doc: JobDocument,
    entry_dir: Path,
    *,
    delivery_id: str,
    mark: ProcessMark,
    started: dt.datetime,
    kill_grace: float,
    work_root: Path,
    clock: Callable[[], float] = time.monotonic,
) -> JobRun:
    """The run of a job an earlier agent process started; its timeout counts from
    ``started``, as it did for that process."""
    if started.tzinfo is None:  # the spool keeps naive UTC
        started = started.replace(tzinfo=dt.UTC)
    elapsed = (utc_now() - started).total_seconds()
    return JobRun(
        doc,
        entry_dir,
        delivery_id,
        mark=mark,
        started=started,
        deadline=clock() + max(0.0, doc.timeout - elapsed),
        kill_grace=kill_grace,
        work_root=work_root,
        clock=clock,
    )


def run_job(
    doc: JobDocument,
    entry_dir: Path,
    *,
    setup: JobSetup,
    delivery_id: str,
    kill_grace: float,
    tick_interval: float,
    on_started: Callable[[ProcessMark], None],
    on_tick: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> StatusReport:
    """Run ``doc`` to its end (``start_job``, then ``wait_job``) and return its final status."""
    run = start_job(
        doc,
        entry_dir,
        setup=setup,
        delivery_id=delivery_id,
        kill_grace=kill_grace,
        on_started=on_started,
        clock=clock,
    )
    if isinstance(run, StatusReport):
        return run
    return wait_job(run, tick_interval, on_tick, clock)


def wait_job(
    run: JobRun,
    tick_interval: float,
    on_tick: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> StatusReport:
    """Wait for ``run`` to end; ``on_tick()`` runs every ``tick_interval`` seconds and
    returns True when the job must be cancelled."""
    next_tick = clock() + tick_interval
    try:
        while True:
            report = run.check()
            if report is not None:
                return report
            now = clock()
            if now >= next_tick:
                next_tick = now + tick_interval
                if on_tick():
                    log.warning("job %s (%s): cancelled while running", run.job_id, run.doc.name)
                    run.stop("cancelled", CANCELLED_REASON)
            run.wait(min(WAIT_STEP, max(0.0, next_tick - clock())))
    except BaseException:
        # The agent is going down (an error in on_tick, ^C): take the job with it;
        # its journal still says started, so the next run's recover() reports it.
        run.kill()
        raise


def _read_line(fd: int, timeout: float) -> str:
    """One line from the pipe ``fd`` (closed after), or what came before end-of-file
    or ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 512)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace").strip()


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
