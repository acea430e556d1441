"""The README's quick start, run as written: the commands are read from README.md.

Three things differ from a reader's run, each for the test's own sake: HOME is
a temporary directory (``~`` stays inside it), port 8443 becomes a free port
(tests run side by side), and TOKEN / FINGERPRINT are what ``client token``
printed, as the README tells the reader to do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import BIN, free_port

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- quick-start:"


def quick_start_commands() -> list[str]:
    text = README.read_text()
    assert MARKER in text, "README.md lost its quick-start marker"
    block = text.split(MARKER, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    commands = []
    for line in joined.splitlines():
        command = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()
        if command:
            commands.append(command)
    return commands


def test_quick_start_as_written(tmp_path: Path) -> None:
    commands = quick_start_commands()
    assert [c.split()[0] for c in commands] == [
        "scire-admin",
        "scire-server",
        "scire-admin",
        "scire-client",
        "scire-client",
        "scire-admin",
        "scire-admin",
    ]
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}"}
    ports = {"8443": str(free_port()), "8444": str(free_port())}
    values: dict[str, str] = {}
    background: list[subprocess.Popen[bytes]] = []
    try:
        for command in commands:
            for name, value in {**ports, **values}.items():
                command = command.replace(name, value)
            if command.endswith("&"):
                program = command.split()[0]
                log = tmp_path / f"{program}.log"
                with open(log, "wb") as out:
                    process = subprocess.Popen(
                        ["bash", "-c", command[:-1]],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                background.append(process)
                ready = "listening on" if program == "scire-server" else "daemon started"
                _wait_for(log, ready, process)
                continue
            proc = subprocess.run(
                ["bash", "-c", command],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
            assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
            if "client token" in command:
                found = dict(re.findall(r"^(token|ca_fingerprint): (\S+)$", proc.stdout, re.M))
                values = {"TOKEN": found["token"], "FINGERPRINT": found["ca_fingerprint"]}
        assert "succeeded" in proc.stdout
        assert (tmp_path / ".config" / "scire" / "admin.conf").exists()
        # The agent runs on as a daemon, and the server knows it.
        clients = json.loads(
            subprocess.run(
                ["scire-admin", "--json", "client", "list"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        )
        assert [(c["name"], c["agent_mode"], c["online"]) for c in clients] == [
            ("web-17", "daemon", True)
        ]
    finally:
        for process in reversed(background):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, log.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never came: {log.read_text(errors='replace')}")
