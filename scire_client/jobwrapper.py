"""The job's parent: waits for the job and records how it ended, whatever befalls the agent.

Only a process's parent learns its exit status. Were the agent the job's
parent, an agent killed while a job runs would lose it; so the runner starts
this small program (``python -I -m scire_client.jobwrapper``) in a session of
its own, as the agent's user, and it starts the job:

1. it spawns the job's gate (``/bin/sh`` waiting for the runner's go-ahead on
   the stdin this wrapper passes on, see ``runner.py``) as the leader of a new
   process group, as the job's user;
2. it writes the job's pid, one line, to the descriptor named on its command
   line, and closes it; from then on the gate's stdin is the runner's alone, so
   an agent that dies before the go-ahead leaves a gate that reads end-of-file;
3. it waits for the job, then writes the exit record (``EXIT_RECORD`` in the
   job's spool entry: JSON ``wrapper_pid``, ``exit_status``, ``finished_at``)
   atomically, and exits.

The runner signals the job's process group, never this one, so a timeout or a
cancellation is recorded too; SIGTERM, SIGINT and SIGHUP sent to the wrapper
itself are ignored (a handler, not ``SIG_IGN``, which the job would inherit).
It runs with the job's environment and working directory, which it hands on.

Command line: ``RECORD PID_FD UID GID GROUPS INTERPRETER SCRIPT``, where UID
is ``-`` for "the wrapper's own user" and GROUPS a comma-separated list.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from scire_schema.files import write_atomic

# Every job starts one of these: it imports as little as it can (no json, no
# scire_schema.protocol and its enums; about 20 ms less per job).

EXIT_RECORD = "exit_status"
GATE_EXIT = 125  # the gate's exit status when it never got the go-ahead
START_FAILED = 126  # the wrapper's exit status when it could not spawn the job
SAME_USER = "-"
#: The gate: wait for the runner's go-ahead, then become the interpreter.
GATE = f'IFS= read -r go && [ "$go" = go ] || exit {GATE_EXIT}; exec "$@" </dev/null'


def _ignore(_signum: int, _frame: object) -> None:
    """Stay alive to record the job's end; the job's own signals go to its group."""


def _record(path: Path, wrapper_pid: int, exit_status: int) -> None:
    # JSON of two integers and a time (protocol.format_time's form: UTC, Z).
    finished = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    record = (
        f'{{"exit_status": {int(exit_status)}, "finished_at": "{finished}Z", '
        f'"wrapper_pid": {int(wrapper_pid)}}}'
    )
    write_atomic(path, record.encode())


def environment_as_given() -> dict[bytes, bytes] | None:
    """The environment the runner started us with, exactly. Python's start-up
    may add ``LC_CTYPE`` to our own (C locale coercion, PEP 538, when the job's
    ``LANG`` names a locale this host lacks), and the job must not inherit it.
    ``/proc/self/environ`` still holds what ``execve`` got; None without /proc."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)


def main(argv: Sequence[str]) -> int:
    if len(argv) not in (8, 9):
        print(
            f"usage: {argv[0]} RECORD PID_FD UID GID GROUPS INTERPRETER [ARGUMENT] SCRIPT",
            file=sys.stderr,
        )
        return 2
    record = Path(argv[1])
    pid_fd = int(argv[2])
    switch = argv[3] != SAME_USER
    # The interpreter, with the one argument a shebang line may give it, then the script.
    command = argv[6:]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore)
    try:
        job = subprocess.Popen(
            ["/bin/sh", "-c", GATE, "scire-job", *command],
            stdin=0,
            env=environment_as_given(),
            process_group=0,
            # setgroups, setregid, setreuid in the child, after fork and before exec.
            user=int(argv[3]) if switch else None,
            group=int(argv[4]) if switch else None,
            extra_groups=[int(g) for g in argv[5].split(",") if g] if switch else None,
        )
    except OSError as exc:
        os.write(pid_fd, f"error {exc}\n".encode())
        os.close(pid_fd)
        return START_FAILED
    os.write(pid_fd, f"{job.pid}\n".encode())
    os.close(pid_fd)
    # The job holds the gate, its output and nothing of ours; we keep none of them open.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    status = job.wait()
    _record(record, os.getpid(), status)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
