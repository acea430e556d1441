"""Durable file writes: a crash leaves the old or the new file, never half of one.

Both programs keep state in files (the server's CA and keys, the agent's key,
certificates and spool), always written through here.
"""

from __future__ import annotations

import os

# The job wrapper writes one file per job through here, so this module imports
# neither pathlib (5 ms: it brings urllib.parse and ipaddress) nor typing (its
# names are for the type checker only, which reads this constant as True).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike

    StrPath = str | PathLike[str]


def write_atomic(path: StrPath, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new
    file, never half of one; the file has ``mode`` from its first byte."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    directory = directory or "."
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp: importing tempfile is a third of the start-up of
    # the job wrapper, which writes one file per job.
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(path: StrPath) -> None:
    """Make a rename or removal in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: StrPath, data: bytes) -> None:
    """A secret (key, user bundle): mode 0600."""
    write_atomic(path, data, 0o600)


def write_public(path: StrPath, data: bytes) -> None:
    """A certificate or request: mode 0644."""
    write_atomic(path, data, 0o644)
