"""Both programs' log lines: text as before, or one JSON object per line
with the shared event keys."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from scire_schema import logformat


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_event_keys_and_defaults(restore_logging: None) -> None:
    stream = io.StringIO()
    logformat.configure(
        "scire-server", "INFO", "json", defaults={"server": "s1:8443"}, stream=stream
    )
    log = logging.getLogger("scire_server.test")
    log.info(
        "job %s on %s: %s",
        7,
        "web-1",
        "sent -> acknowledged",
        extra=logformat.event(
            job=7, client="web-1", who="client:web-1", what="sent -> acknowledged"
        ),
    )
    log.debug("not at INFO")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("it failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "job 7 on web-1: sent -> acknowledged"
    assert {k: first[k] for k in logformat.EVENT_KEYS} == {
        "job": 7,
        "client": "web-1",
        "who": "client:web-1",
        "what": "sent -> acknowledged",
        "server": "s1:8443",
    }
    assert first["program"] == "scire-server"
    assert first["level"] == "INFO"
    assert first["logger"] == "scire_server.test"
    assert first["time"].endswith("Z")
    assert second["level"] == "ERROR"
    assert "RuntimeError: boom" in second["error"]
    assert "job" not in second


def test_text_format_is_the_old_line(restore_logging: None) -> None:
    stream = io.StringIO()
    logformat.configure("scire-client", logging.INFO, "text", stream=stream)
    logging.getLogger("scire_client").warning("hello %s", "there")
    assert " scire-client[" in stream.getvalue()
    assert stream.getvalue().rstrip().endswith("WARNING hello there")


def test_unknown_format_and_level_are_refused(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="log_format"):
        logformat.configure("scire-server", "INFO", "xml")
    with pytest.raises(ValueError, match="log_level"):
        logformat.configure("scire-server", "LOUD", "text")


def test_event_keeps_only_known_values() -> None:
    assert logformat.event(job=1, client=None, who="server") == {"job": 1, "who": "server"}
