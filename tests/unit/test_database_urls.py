"""Database URLs and driver words as outputs and logs show them, the missing
driver's line, the outage tracker and the SQLite daemon lock."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from scire_schema.protocol import parse_retry_after
from scire_server.exceptions import ConfigError, DatabaseUnreachable, InstanceConflict
from scire_server.store import database
from scire_server.store.database import (
    SqliteDaemonLock,
    driver_words,
    make_engine,
    missing_driver,
    redacted,
    sqlite_path,
    wait_until_reachable,
)
from scire_server.store.outage import OUTAGE_RETRY_AFTER, Outage


def test_redacted_hides_the_password() -> None:
    assert (
        redacted("postgresql+psycopg://scire:s3cret@db:5432/scire")
        == "postgresql+psycopg://scire:***@db:5432/scire"
    )
    assert redacted("postgresql+psycopg://scire@db/scire") == "postgresql+psycopg://scire@db/scire"
    assert redacted("sqlite:////var/lib/scire/scire.db") == "sqlite:////var/lib/scire/scire.db"


def test_redacted_keeps_the_hosts_of_a_multi_host_url_readable() -> None:
    url = (
        "postgresql+psycopg://scire:s3cret@/scire"
        "?host=a:5432&host=b:5433&target_session_attrs=read-write"
    )
    shown = redacted(url)
    assert "s3cret" not in shown
    assert "host=a:5432&host=b:5433" in shown
    assert "target_session_attrs=read-write" in shown


def test_redacted_hides_a_password_given_in_the_query_or_an_unreadable_url() -> None:
    assert "s3cret" not in redacted("postgresql+psycopg://scire@db/scire?password=s3cret")
    assert "s3cret" not in redacted("postgresql+psycopg://scire:s3cret@db:notaport/scire")


def test_driver_words_hide_the_password_libpq_quotes() -> None:
    url = "postgresql+psycopg://scire:p%40ss@db/scire"
    error = RuntimeError("invalid connection option: password=p@ss host=db\nDETAIL: more")
    assert driver_words(error, url) == "invalid connection option: password=*** host=db"
    quoted = RuntimeError("could not connect with 'p@ss' to db")
    assert driver_words(quoted, url) == "could not connect with '***' to db"


def test_a_missing_driver_names_the_extra_to_install() -> None:
    error = missing_driver(
        ModuleNotFoundError("No module named 'psycopg'", name="psycopg"),
        "postgresql+psycopg://scire:s3cret@db/scire",
    )
    assert isinstance(error, ConfigError)
    assert "pip install 'scire[postgresql]'" in error.message
    assert "psycopg" in error.message and "s3cret" not in error.message


def test_make_engine_turns_the_missing_module_into_that_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    with pytest.raises(ConfigError, match=r"pip install 'scire\[postgresql\]'"):
        make_engine("postgresql+psycopg://scire:s3cret@db/scire")


def test_make_engine_passes_a_multi_host_url_through_to_libpq() -> None:
    engine = make_engine(
        "postgresql+psycopg://scire:s3cret@/scire"
        "?host=a:5432&host=b:5433&target_session_attrs=read-write",
        pool_size=20,
    )
    _, params = engine.dialect.create_connect_args(engine.url)
    assert params["host"] == "a,b" and params["port"] == "5432,5433"
    assert params["target_session_attrs"] == "read-write"
    assert engine.pool.size() == 20  # type: ignore[attr-defined]


def test_a_bad_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="not valid"):
        make_engine("postgresql+psycopg://scire:s3cret@db:notaport/scire")


def test_the_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage("postgresql+psycopg://scire:***@db/scire")
    caplog.set_level(logging.WARNING, logger="scire_server.store")
    outage.answered()
    errors = [outage.failed("connection refused") for _ in range(3)]
    assert all(isinstance(e, DatabaseUnreachable) for e in errors)
    assert parse_retry_after(errors[0].message) == OUTAGE_RETRY_AFTER
    assert outage.ongoing
    outage.answered()
    outage.answered()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("database unreachable: connection refused")
    assert "answering Unavailable until it is back" in lines[0]
    assert lines[1].startswith("database reachable again after ")
    assert lines[1].endswith("; 3 calls answered Unavailable")
    assert not outage.ongoing


def test_start_up_gives_up_on_an_unreachable_database_after_the_wait() -> None:
    now = [0.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(database.Unavailable, match="did not answer within 20 s") as caught:
        wait_until_reachable(
            # Port 1 on localhost: refused at once.
            "postgresql+psycopg://scire:s3cret@127.0.0.1:1/scire",
            20,
            lambda why, pause: pauses.append(pause),
            clock=lambda: now[0],
            sleep=sleep,
        )
    assert "s3cret" not in caught.value.message
    assert pauses == [2, 4, 8, 6]  # backing off, never past the wait


def test_sqlite_path_of_a_url() -> None:
    assert sqlite_path("sqlite:////var/lib/scire/scire.db") == Path("/var/lib/scire/scire.db")
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("postgresql+psycopg://scire@db/scire") is None


def test_a_second_holder_of_the_sqlite_file_is_refused(tmp_path: Path) -> None:
    first = SqliteDaemonLock(tmp_path / "scire.db")
    first.acquire("host:8443")
    second = SqliteDaemonLock(tmp_path / "scire.db")
    with pytest.raises(InstanceConflict, match=r"in use by daemon 'host:8443' \(pid \d+\)"):
        second.acquire("host:8444")
    first.release()
    second.acquire("host:8444")  # free again
    second.release()
