"""``ServerConfig`` from the ``[server]`` section and ``scire-server``'s flags:
job retention (``job_retention_days``) and the advice on kept-alive connections."""

from __future__ import annotations

from pathlib import Path

import pytest

from scire_server import cli
from scire_server.config import ServerConfig
from scire_server.exceptions import ConfigError


def ini(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "server.ini"
    path.write_text("\n".join(["[server]", f"state_dir = {tmp_path}", *lines]) + "\n")
    return path


def test_job_retention_is_off_by_default(tmp_path: Path) -> None:
    assert ServerConfig.load(ini(tmp_path)).job_retention_days == 0
    assert cli.load_config(cli.parse_args(["--state-dir", str(tmp_path)])).job_retention_days == 0


def test_job_retention_days_from_the_ini_file_and_the_flag(tmp_path: Path) -> None:
    path = ini(tmp_path, "job_retention_days = 90")
    assert ServerConfig.load(path).job_retention_days == 90
    assert cli.load_config(cli.parse_args(["-c", str(path)])).job_retention_days == 90
    args = cli.parse_args(["-c", str(path), "--job-retention-days", "7"])
    assert cli.load_config(args).job_retention_days == 7  # the flag wins
    args = cli.parse_args(["--state-dir", str(tmp_path), "--job-retention-days", "0"])
    assert cli.load_config(args).job_retention_days == 0


@pytest.mark.parametrize("value", ["-1", "ninety"])
def test_a_bad_job_retention_days_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="job_retention_days"):
        ServerConfig.load(ini(tmp_path, f"job_retention_days = {value}"))


def test_kept_alive_connections_outlast_the_poll_interval_by_default(tmp_path: Path) -> None:
    config = ServerConfig.load(ini(tmp_path))
    assert config.idle_timeout > config.poll_interval * 1.1
    assert config.advice() == []


def test_an_idle_timeout_shorter_than_the_poll_interval_is_named_at_start(
    tmp_path: Path,
) -> None:
    config = ServerConfig.load(ini(tmp_path, "poll_interval = 300"))
    (line,) = config.advice()
    assert "idle_timeout 90 s" in line and "300 s" in line and "raise idle_timeout" in line
