"""How both programs write their log: the text line they always wrote, or
one JSON object per line (``log_format = json``) a journal can index.

One vocabulary of event keys on both sides, so a job can be followed from
the server's log into the agent's and back (``event`` builds the ``extra=``
of a log call from it):

* ``job``: the job id;
* ``client``: the host, by its client name;
* ``who``: who acted (``user:alice``, ``client:web-17``, ``server``);
* ``what``: what happened (``sent -> acknowledged``, ``submitted``);
* ``server``: the server daemon (its instance key on the server, the URL the
  agent talked to on the agent).

A program sets defaults for keys that hold for every line (the server's own
instance key, the agent's client name). A JSON line always has ``time``
(UTC, ISO 8601), ``level``, ``program``, ``pid``, ``logger`` and ``message``,
then the event keys that are known, and ``error`` with a traceback when one
was logged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")
EVENT_KEYS = ("job", "client", "who", "what", "server")
TEXT_FORMAT = "%(asctime)s {program}[%(process)d] %(levelname)s %(message)s"


def event(
    *,
    job: int | None = None,
    client: str | None = None,
    who: str | None = None,
    what: str | None = None,
    server: str | None = None,
) -> dict[str, Any]:
    """The ``extra=`` of a log call: the event keys that are known."""
    values = {"job": job, "client": client, "who": who, "what": what, "server": server}
    return {key: value for key, value in values.items() if value is not None}


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, program: str, defaults: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.program = program
        self.defaults = {k: v for k, v in (defaults or {}).items() if k in EVENT_KEYS}

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "program": self.program,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EVENT_KEYS:
            value = getattr(record, key, None)
            if value is None:
                value = self.defaults.get(key)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["error"] = record.exc_text
        # Never more than one line, whatever a message holds: json escapes newlines.
        return json.dumps(line, ensure_ascii=False, default=str)


class JournalFormatter(logging.Formatter):
    """Text for a stderr the systemd journal reads: no time and no pid (the
    journal records both), and the level as a ``<N>`` syslog prefix, which the
    journal turns into the line's priority."""

    PRIORITIES = {
        logging.CRITICAL: 2,
        logging.ERROR: 3,
        logging.WARNING: 4,
        logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """True when stderr is the systemd journal's stream (``JOURNAL_STREAM`` names
    its device and inode; a stderr redirected elsewhere does not match)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(sys.stderr.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def configure(
    program: str,
    level: str | int,
    log_format: str = "text",
    defaults: Mapping[str, Any] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send the root logger's records to ``stream`` (stderr) in ``log_format``,
    replacing whatever handler was there. ``ValueError`` for an unknown format
    or level."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format {log_format!r} is not one of {', '.join(FORMATS)}")
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"log_level {level!r} is not a logging level")
        level = number
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter(program, defaults))
    elif stream is None and stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.format(program=program)))
    logging.basicConfig(level=level, handlers=[handler], force=True)
