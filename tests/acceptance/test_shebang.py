"""Shebang lines: a script submitted without ``--interpreter`` runs by its
``#!`` line; without one, under the server's default interpreter (/bin/sh)."""

from __future__ import annotations

from conftest import Deployment


def output_of(dep: Deployment, job: int) -> str:
    detail = dep.wait_job(job)
    (assignment,) = detail["assignments"]
    assert assignment["state"] == "succeeded", assignment
    return str(assignment["output"])


def test_a_script_runs_by_its_shebang_line_when_no_interpreter_is_given(
    running: Deployment,
) -> None:
    dep = running
    dep.enroll("web-1")
    python = dep.root / "probe.py"
    python.write_text("#!/usr/bin/env python3\nimport sys\nprint('python', sys.version_info[0])\n")
    shell = dep.root / "probe.sh"
    # $0 is the script's path under sh; no shebang, so the server's default.
    shell.write_text('echo "shell $(basename "$(readlink -f /proc/$$/exe)")"\n')
    flagged = dep.root / "flagged.sh"
    # The one argument a shebang line gives: sh -e stops at the first failure.
    flagged.write_text("#!/bin/sh -e\necho before\nfalse\necho after\n")
    by_shebang = dep.submit("--script", str(python), "--host", "web-1")
    by_default = dep.submit("--script", str(shell), "--host", "web-1")
    with_argument = dep.submit("--script", str(flagged), "--host", "web-1")
    # An explicit interpreter wins over the shebang line.
    explicit = dep.submit("--script", str(python), "--host", "web-1", "--interpreter", "/bin/cat")
    assert dep.job(by_shebang)["interpreter"] == ""
    assert dep.job(by_default)["interpreter"] == "/bin/sh"
    dep.run_agent("web-1")
    assert output_of(dep, by_shebang) == "python 3\n"
    assert output_of(dep, by_default).startswith("shell ")
    assert "python" not in output_of(dep, by_default)
    assert output_of(dep, explicit) == python.read_text()
    detail = dep.wait_job(with_argument)
    (assignment,) = detail["assignments"]
    assert (assignment["state"], assignment["output"]) == ("failed", "before\n")
