"""Exit codes of the three programs, in one place so scripts can rely on them.

Each code means one thing whichever program returns it; a program returns
only the codes that apply to it (``PROGRAM_CODES``), and its ``--help``
epilog lists them from here (``epilog``), as does ``docs/ADMIN.md``.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  #: all good
    ERROR = 1  #: any other failure: the server refused the call, a full disk, a damaged file
    USAGE = 2  #: bad command line, configuration or argument (argparse uses 2 as well)
    ENROLLMENT_PENDING = 3  #: the agent's enrollment waits for an administrator
    ENROLLMENT_REFUSED = 4  #: the agent's enrollment was rejected
    HOSTS_FAILED = 5  #: some hosts did not succeed (failed, timed out, denied, expired, cancelled)
    TARGETS_REFUSED = 6  #: the job was submitted, but some targets were refused
    NOT_FINISHED = 7  #: the wait ran out before every host had finished
    NOT_FOUND = 8  #: no such job, schedule, client, user, group or grant
    PERMISSION_DENIED = 9  #: the server knows the caller but refuses this to them
    UNREACHABLE = 10  #: no connection: server down, TLS failure, wrong port, timeout, busy
    INSTANCE_CONFLICT = 11  #: scire-server: another live daemon holds this key or SQLite file
    INTERRUPTED = 130  #: Ctrl-C (128 + SIGINT, as the shell counts)


MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "all good",
    ExitCode.ERROR: "other error (the message says which)",
    ExitCode.USAGE: "bad command line, configuration or argument",
    ExitCode.ENROLLMENT_PENDING: "enrollment waits for an administrator",
    ExitCode.ENROLLMENT_REFUSED: "enrollment refused",
    ExitCode.HOSTS_FAILED: "some hosts did not succeed (failed, timed out, denied, ...)",
    ExitCode.TARGETS_REFUSED: "job submitted, but some targets were refused",
    ExitCode.NOT_FINISHED: "gave up waiting before every host had finished",
    ExitCode.NOT_FOUND: "no such job, schedule, client, user, group or grant",
    ExitCode.PERMISSION_DENIED: "permission denied",
    ExitCode.UNREACHABLE: "server unreachable (down, TLS failure, wrong port, timeout, busy)",
    ExitCode.INSTANCE_CONFLICT: "another live daemon holds this instance key or SQLite file",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}

PROGRAM_CODES: dict[str, tuple[ExitCode, ...]] = {
    "scire-admin": (
        ExitCode.OK,
        ExitCode.ERROR,
        ExitCode.USAGE,
        ExitCode.HOSTS_FAILED,
        ExitCode.TARGETS_REFUSED,
        ExitCode.NOT_FINISHED,
        ExitCode.NOT_FOUND,
        ExitCode.PERMISSION_DENIED,
        ExitCode.UNREACHABLE,
        ExitCode.INTERRUPTED,
    ),
    "scire-client": (
        ExitCode.OK,
        ExitCode.ERROR,
        ExitCode.USAGE,
        ExitCode.ENROLLMENT_PENDING,
        ExitCode.ENROLLMENT_REFUSED,
        ExitCode.INTERRUPTED,
    ),
    "scire-server": (
        ExitCode.OK,
        ExitCode.ERROR,
        ExitCode.USAGE,
        ExitCode.INSTANCE_CONFLICT,
    ),
}


def epilog(program: str) -> str:
    """The "exit codes" paragraph of ``program``'s ``--help``."""
    lines = ["exit codes:"]
    lines += [f"  {int(code):<3}  {MEANING[code]}" for code in PROGRAM_CODES[program]]
    return "\n".join(lines)
