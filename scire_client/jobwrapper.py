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

import _signal  # not ``signal``, whose enums import ``enum``: 6 ms of every job's start
import os
import sys
import time

from scire_schema.files import write_atomic

TYPE_CHECKING = False  # not from typing: importing it costs more than this whole program
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# Every job starts one of these, so it imports as little as it can: no json,
# pathlib, datetime or subprocess (the job is started with os.posix_spawn;
# subprocess only when it runs as another user). About 20 ms of CPU per job less.

EXIT_RECORD = "exit_status"
GATE_EXIT = 125  # the gate's exit status when it never got the go-ahead
START_FAILED = 126  # the wrapper's exit status when it could not spawn the job
SAME_USER = "-"
#: The gate: wait for the runner's go-ahead, then become the interpreter.
GATE = f'IFS= read -r go && [ "$go" = go ] || exit {GATE_EXIT}; exec "$@" </dev/null'


def _ignore(_signum: int, _frame: object) -> None:
    """Stay alive to record the job's end; the job's own signals go to its group."""


def _record(path: str, wrapper_pid: int, exit_status: int) -> None:
    # JSON of two integers and a time (protocol.format_time's form: UTC, Z).
    now = time.time()
    finished = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    micro = int(now % 1 * 1_000_000)
    record = (
        f'{{"exit_status": {int(exit_status)}, "finished_at": "{finished}.{micro:06d}Z", '
        f'"wrapper_pid": {int(wrapper_pid)}}}'
    )
    write_atomic(path, record.encode())


def environment_as_given() -> dict[bytes, bytes] | None:
    """The environment the runner started us with, exactly. Python's start-up
    may add ``LC_CTYPE`` to our own (C locale coercion, PEP 538, when the job's
    ``LANG`` names a locale this host lacks), and the job must not inherit it.
    ``/proc/self/environ`` still holds what ``execve`` got; None without /proc."""
    try:
        with open("/proc/self/environ", "rb") as environ:
            raw = environ.read()
    except OSError:
        return None
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)


def _spawn(argv: Sequence[str], gate: list[str], pid_fd: int) -> tuple[int, Callable[[], int]]:
    """Start the gate as the leader of a new process group: its pid, and how to
    wait for its exit status (negative: the signal that ended it). The job
    inherits only the standard descriptors (the runner passes no others but
    ``pid_fd``)."""
    env = environment_as_given()
    if argv[3] == SAME_USER:
        os.set_inheritable(pid_fd, False)
        pid = os.posix_spawn(gate[0], gate, env if env is not None else os.environ, setpgroup=0)
        return pid, lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    import subprocess  # setgroups, setregid, setreuid after fork, before exec

    job = subprocess.Popen(
        gate,
        stdin=0,
        env=env,
        process_group=0,
        user=int(argv[3]),
        group=int(argv[4]),
        extra_groups=[int(g) for g in argv[5].split(",") if g],
    )
    return job.pid, job.wait


def main(argv: Sequence[str]) -> int:
    if len(argv) not in (8, 9):
        print(
            f"usage: {argv[0]} RECORD PID_FD UID GID GROUPS INTERPRETER [ARGUMENT] SCRIPT",
            file=sys.stderr,
        )
        return 2
    record = argv[1]
    pid_fd = int(argv[2])
    # The interpreter, with the one argument a shebang line may give it, then the script.
    command = argv[6:]
    for signum in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(signum, _ignore)
    try:
        job_pid, wait = _spawn(argv, ["/bin/sh", "-c", GATE, "scire-job", *command], pid_fd)
    except OSError as exc:
        os.write(pid_fd, f"error {exc}\n".encode())
        os.close(pid_fd)
        return START_FAILED
    os.write(pid_fd, f"{job_pid}\n".encode())
    os.close(pid_fd)
    # The job holds the gate, its output and nothing of ours; we keep none of them open.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    status = wait()
    _record(record, os.getpid(), status)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
