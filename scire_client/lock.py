"""One agent process per state directory.

Normal mode runs from cron, so a long job can still be running when the next
run starts; two processes on one spool could run a job twice. An exclusive
``flock`` on ``state_dir/lock`` keeps the second out. The kernel drops the
lock when the holder dies, so a crash never leaves it stale, and job
processes never inherit it (``subprocess`` closes other descriptors).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from scire_client.exceptions import AgentBusy


@contextlib.contextmanager
def hold(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise AgentBusy(f"another scire-client holds {path}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for the operator who wonders who
        yield
    finally:
        os.close(fd)
