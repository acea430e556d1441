"""docs/DEPLOYMENT.md and the files it installs stay true: every INI block in
the page loads as the program's typed configuration (no key a program does not
know), the units pass ``systemd-analyze verify``, and the cron line names a
real subcommand."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import BIN

from scire_client.config import ClientConfig
from scire_server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = ROOT / "docs" / "DEPLOYMENT.md"
UNITS = sorted((ROOT / "scripts" / "systemd").glob("*.service"))


def ini_blocks() -> list[str]:
    return re.findall(r"```ini\n(.*?)```", DEPLOYMENT.read_text(), flags=re.S)


def test_the_page_has_the_server_and_agent_configurations() -> None:
    sections = [block.split("\n", 1)[0] for block in ini_blocks()]
    assert sections[:2] == ["[server]", "[client]"]


def test_every_ini_block_loads(tmp_path: Path) -> None:
    client_lines: list[str] = []
    for number, block in enumerate(ini_blocks()):
        if block.startswith("[client]"):
            client_lines = block.splitlines()
        elif not block.startswith("["):
            # A block that adds keys to the agent's file, as the page tells the reader.
            block = "\n".join(client_lines + block.splitlines()) + "\n"
        path = tmp_path / f"block{number}.ini"
        path.write_text(block.replace("/var/lib/", f"{tmp_path}/var/lib/"))
        if block.startswith("[server]"):
            config = ServerConfig.load(path)
            assert config.public_url == "https://scire.example.net:8443/"
        else:
            ClientConfig.load(path)


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_units_verify(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd"
    text = unit.read_text().replace("/opt/scire/bin", str(BIN))
    # man pages are not installed on a test machine; the units still name them.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("Documentation="))
    copy = tmp_path / unit.name
    copy.write_text(text + "\n")
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # verify also reads the host's own units; only ours are under test.
        if unit.name in line
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_units_and_cron_run_real_subcommands() -> None:
    commands = [
        line.split("=", 1)[1]
        for unit in UNITS
        for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    cron = (ROOT / "scripts" / "cron" / "scire-client").read_text()
    commands += [
        line.split(" root ", 1)[1].split(">>")[0]
        for line in cron.splitlines()
        if line.startswith("* ")
    ]
    assert len(commands) == 3
    for command in commands:
        argv = command.split()
        program = BIN / Path(argv[0]).name
        # --help after the subcommand: exit 0 only when the subcommand exists.
        result = subprocess.run(
            [str(program), *argv[1:], "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{command}: {result.stderr}"
