"""How a job runs, end to end: as the configured user, in a fresh directory,
with exactly the documented environment, and with its script and output
carried byte-exact through the real scire-admin, server and agent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Deployment

#: What the runner sets; the interpreter (/bin/sh) adds PWD itself.
DOCUMENTED = {
    "PATH",
    "LANG",
    "HOME",
    "USER",
    "LOGNAME",
    "TMPDIR",
    "SCIRE_JOB_ID",
    "SCIRE_DELIVERY_ID",
    "SCIRE_JOB_NAME",
    "SCIRE_ATTEMPT",
    "SCIRE_OWNER",
    "SCIRE_CLIENT",
    "SCIRE_SERVER",
}
SHELL_ADDED = {"PWD"}


@pytest.fixture
def work_root() -> Iterator[Path]:
    """A work_root outside the tests' private temporary tree (mode 0700 above it),
    so ``nobody`` can reach it."""
    root = Path(tempfile.mkdtemp(prefix="scire-work-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _config(dep: Deployment, name: str, text: str) -> Path:
    path = dep.root / f"{name}.ini"
    path.write_text("[client]\n" + text, encoding="utf-8")
    return path


def _output(dep: Deployment, job_id: int, host: str) -> str:
    [assignment] = [a for a in dep.job(job_id)["assignments"] if a["client"] == host]
    assert assignment["state"] == "succeeded", assignment
    return str(assignment["output"])


def _stored_output(dep: Deployment, job_id: int) -> str:
    with sqlite3.connect(dep.state_dir / "scire.db") as db:
        [(output,)] = db.execute("SELECT output FROM assignments WHERE job_id = ?", (job_id,))
    return str(output)


def _lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_a_job_runs_as_nobody_with_the_documented_environment(
    running: Deployment, work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = running
    assert os.geteuid() == 0, "run_as needs the tests to run as root"
    dep.enroll("web1")
    spool = dep.agent_dir("web1") / "spool"
    config = _config(
        dep,
        "web1",
        f"run_as = nobody\nwork_root = {work_root}\n"
        "pass_environment = PASSED_ON ABSENT_ONE\n"
        "job_environment = GREETING='hello world' LANG=en_US.UTF-8\n",
    )
    monkeypatch.setenv("LEAK_MARKER", "must-not-reach-the-job")
    monkeypatch.setenv("PASSED_ON", "from-the-agent")
    script = (
        "echo user=$(id -un)\n"
        "echo cwd=$(pwd)\n"
        f"touch {spool}/probe 2>/dev/null && echo spool=writable || echo spool=refused\n"
        f"ls {spool} >/dev/null 2>&1 && echo list=allowed || echo list=refused\n"
        'touch "$TMPDIR/t" && echo tmp=writable\n'
        "echo here > left-behind && echo cwd-file=written\n"
        "echo files=$(ls -A | tr '\\n' ' ')\n"
        "echo ---\n"
        "env\n"
    )
    first = dep.submit("--host", "web1", "--command", script, "--name", "whoami")
    second = dep.submit("--host", "web1", "--command", script, "--name", "again")
    proc = dep.agent("web1", "-c", str(config), "run")
    assert proc.returncode == 0, proc.stderr

    for job_id in (first, second):
        head, _, env_text = _output(dep, job_id, "web1").partition("---\n")
        facts = _lines(head)
        tree = work_root / str(job_id)
        assert facts["user"] == "nobody"
        assert facts["cwd"] == str(tree / "work")
        assert facts["spool"] == "refused"
        assert facts["list"] == "refused"
        assert facts["tmp"] == "writable"
        assert facts["cwd-file"] == "written"
        assert facts["files"].split() == ["left-behind"]  # fresh: nothing of the other job
        env = _lines(env_text)
        assert set(env) == DOCUMENTED | SHELL_ADDED | {"PASSED_ON", "GREETING"}
        assert env["USER"] == env["LOGNAME"] == "nobody"
        assert env["HOME"] == str(tree / "work")  # nobody's home (/nonexistent) is not there
        assert env["TMPDIR"] == str(tree / "tmp")
        assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        assert env["LANG"] == "en_US.UTF-8"  # job_environment may replace LANG
        assert env["GREETING"] == "hello world"
        assert env["PASSED_ON"] == "from-the-agent"
        assert env["SCIRE_JOB_ID"] == str(job_id)
        assert env["SCIRE_ATTEMPT"] == "1"
        assert env["SCIRE_OWNER"] == "admin"
        assert env["SCIRE_CLIENT"] == "web1"
        assert env["SCIRE_SERVER"] == dep.url
        assert len(env["SCIRE_DELIVERY_ID"]) == 32
        assert not tree.exists()  # removed after the job
    assert not (spool / "probe").exists()
    assert _stored_output(dep, first).count("LEAK_MARKER") == 0
    assert (spool / str(first) / "script").read_text() == script  # the spool keeps its copy
    for private in (spool, spool / str(first)):
        assert private.stat().st_mode & 0o777 == 0o700


def test_run_as_a_missing_user_is_refused_at_start_up(running: Deployment) -> None:
    dep = running
    dep.enroll("web2")
    config = _config(dep, "web2", "run_as = no-such-user-here\n")
    proc = dep.agent("web2", "-c", str(config), "run")
    assert proc.returncode == 2
    assert "run_as 'no-such-user-here': no such user" in proc.stderr


def test_run_as_needs_a_work_root_the_user_can_reach(running: Deployment) -> None:
    dep = running
    dep.enroll("web3")
    # The default work_root is in the agent's state directory, under the tests'
    # private (0700) temporary tree: nobody cannot enter it.
    config = _config(dep, "web3", "run_as = nobody\n")
    proc = dep.agent("web3", "-c", str(config), "run")
    assert proc.returncode == 2
    assert "nobody cannot reach work_root" in proc.stderr


SCRIPT = (
    b"import hashlib, sys\r\n"
    b"data = open(sys.argv[0], 'rb').read()\r\n"
    b"print(hashlib.sha256(data).hexdigest())\r\n"
    b"sys.stdout.write('\\x1b[31mred\\x1b[0m\\r\\n\\x07bell \\x01\\x02\\x7f\\u0085 \\u00e9 end\\r')\r\n"
    b"# raw bytes the wire must keep: \x1b[1mbold\x1b[0m \x01\x02\x03\x7f \xc2\x85 \xc3\xa9 \r"
    b"# a bare CR ended the line before this one\n"
)
OUTPUT = "\x1b[31mred\x1b[0m\r\n\x07bell \x01\x02\x7f\x85 \xe9 end\r"


def test_script_and_output_arrive_byte_exact(running: Deployment) -> None:
    dep = running
    dep.enroll("web4")
    script_file = dep.root / "colours.py"
    script_file.write_bytes(SCRIPT)
    job_id = dep.submit(
        "--host", "web4", "--script", str(script_file), "--interpreter", "/usr/bin/python3"
    )
    dep.run_agent("web4")
    stored = _stored_output(dep, job_id)
    checksum, _, printed = stored.partition("\n")
    assert checksum == hashlib.sha256(SCRIPT).hexdigest()
    assert printed == OUTPUT  # every control character, the CRs included
    with sqlite3.connect(dep.state_dir / "scire.db") as db:
        [(script,)] = db.execute("SELECT script FROM jobs WHERE id = ?", (job_id,))
    assert script.encode("utf-8") == SCRIPT
    # `job show` goes over XML-RPC strings, which cannot carry C0 controls:
    # they are shown as U+FFFD there (documented), the database keeps them.
    shown = _output(dep, job_id, "web4")
    assert shown.startswith(checksum + "\n\ufffd[31mred\ufffd[0m")


def test_a_script_that_is_not_utf8_is_refused(running: Deployment) -> None:
    dep = running
    dep.enroll("web5")
    script_file = dep.root / "latin1.sh"
    script_file.write_bytes(b"echo caf\xe9\n")
    error = dep.admin_fails("job", "submit", "--host", "web5", "--script", str(script_file))
    assert "utf-8" in error.lower()
    assert dep.admin("job", "list") == []
