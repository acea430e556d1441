"""The agent's job settings: run_as, work_root and the extra environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scire_client import runner
from scire_client.config import ClientConfig
from scire_client.exceptions import ConfigError


def load(tmp_path: Path, **values: object) -> ClientConfig:
    return ClientConfig.load(None, require_servers=False, state_dir=tmp_path, **values)


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.run_as == ""
    assert config.work_path == tmp_path / "work"
    assert config.extra_environment({"ANY": "x"}) == {}


def test_job_environment_takes_shell_quoting_and_may_replace_path_and_lang(
    tmp_path: Path,
) -> None:
    config = load(
        tmp_path,
        job_environment="GREETING='hello world' PATH=/opt/bin:/usr/bin LANG=de_DE.UTF-8 EMPTY=",
        pass_environment=["PROXY", "MISSING"],
    )
    assert config.extra_environment({"PROXY": "http://p:3128", "OTHER": "no"}) == {
        "PROXY": "http://p:3128",
        "GREETING": "hello world",
        "PATH": "/opt/bin:/usr/bin",
        "LANG": "de_DE.UTF-8",
        "EMPTY": "",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"job_environment": "SCIRE_JOB_ID=7"}, "SCIRE_JOB_ID is set by Scire"),
        ({"job_environment": "HOME=/root"}, "HOME is set by Scire"),
        ({"job_environment": "TMPDIR=/tmp"}, "TMPDIR is set by Scire"),
        ({"job_environment": "JUSTANAME"}, "'JUSTANAME' is not NAME=VALUE"),
        ({"job_environment": "1BAD=x"}, "'1BAD' is not an environment variable name"),
        ({"job_environment": "A='unclosed"}, "job_environment: No closing quotation"),
        ({"pass_environment": ["USER"]}, "pass_environment: USER is set by Scire"),
        ({"pass_environment": ["NO-DASH"]}, "'NO-DASH' is not an environment variable name"),
    ],
)
def test_bad_job_settings_are_refused(
    tmp_path: Path, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, **values)


def test_run_as_resolves_users(tmp_path: Path) -> None:
    me = runner.JobUser.resolve("")
    assert (me.uid, me.switch) == (os.geteuid(), False)
    with pytest.raises(ValueError, match="run_as 'no-such-user-here': no such user"):
        runner.JobUser.resolve("no-such-user-here")
    assert os.geteuid() == 0, "these tests run as root"
    nobody = runner.JobUser.resolve("nobody")
    assert nobody.name == "nobody" and nobody.switch is True
    assert nobody.gid in nobody.groups
    assert runner.JobUser.resolve("root").switch is False  # the agent's own user


def test_an_agent_that_is_not_root_cannot_run_jobs_as_another_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The interpreter of these tests is not reachable by an unprivileged user,
    # so the agent's uid is what is changed here.
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    assert runner.JobUser.resolve("nobody").switch is False  # its own user
    with pytest.raises(ValueError, match="not root, so it cannot run jobs as another user"):
        runner.JobUser.resolve("root")


def test_a_work_root_others_may_write_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    setup = runner.JobSetup(user=runner.JobUser.resolve(""), work_root=root)
    with pytest.raises(ValueError, match="writable by it only"):
        runner.prepare_work_root(setup)


def test_daemon_defaults_and_addresses(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert (config.mode, config.poll_interval, config.poll_jitter) == ("once", 60.0, 0.1)
    assert (config.max_parallel, config.shutdown_grace, config.listen) == (1, 30.0, "")
    config = load(tmp_path, mode="Daemon", listen="0.0.0.0:8444", advertise="web-17.lan:8444")
    assert (config.mode, config.listen, config.advertise) == (
        "daemon",
        "0.0.0.0:8444",
        "web-17.lan:8444",
    )
    assert load(tmp_path, listen="[::1]:0").listen == "[::1]:0"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "sometimes"}, "mode 'sometimes' is not one of once, daemon"),
        ({"poll_interval": 0.5}, "poll_interval must be 1 to 86400 seconds"),
        ({"poll_jitter": 0.9}, "poll_jitter must be 0 to 0.5"),
        ({"max_parallel": 0}, "max_parallel must be 1 to 256"),
        ({"shutdown_grace": -1}, "shutdown_grace must not be negative"),
        ({"listen": "8444"}, "listen '8444' is not HOST:PORT"),
        ({"listen": "127.0.0.1:70000"}, "port 70000 is out of range"),
        ({"listen": "0.0.0.0:8444"}, "set advertise"),
        ({"advertise": "web:8444"}, "advertise needs listen"),
        ({"listen": "127.0.0.1:8444", "advertise": ":8444"}, "names no host"),
        ({"listen": "127.0.0.1:8444", "advertise": "web:0"}, "port 0 is out of range"),
    ],
)
def test_bad_daemon_settings_are_refused(
    tmp_path: Path, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, **values)
