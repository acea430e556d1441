"""Core behaviour end to end: enrollment, targeting through nested groups and the
ACL, priority order, timeouts, output capture, dispatch-time denial, submission
checks, and the XML documents on the agent's disk against the XSDs.

Every test runs a real server, real agents and the real ``scire-admin``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from conftest import Deployment
from lxml import etree

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"

EXIT_PENDING = 3
EXIT_REFUSED = 4


def _clients(dep: Deployment) -> dict[str, str]:
    return {c["name"]: c["status"] for c in dep.admin("client", "list")}


def _enroll_pending(dep: Deployment, name: str, token: str | None = None) -> int:
    """``scire-client enroll`` without waiting for an administrator; its exit code."""
    return dep.agent(name, "--enroll-wait", "0", "enroll", token=token).returncode


def _assignments(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["client"]: a for a in job["assignments"]}


def test_enrollment_by_approval_and_rejection(running: Deployment) -> None:
    dep = running
    assert _enroll_pending(dep, "host1") == EXIT_PENDING
    assert _clients(dep)["host1"] == "pending"
    assert not (dep.agent_dir("host1") / "cert.pem").exists()

    dep.admin("client", "accept", "host1")
    assert _enroll_pending(dep, "host1") == 0
    assert (dep.agent_dir("host1") / "cert.pem").exists()
    assert _clients(dep)["host1"] == "accepted"

    assert _enroll_pending(dep, "host2") == EXIT_PENDING
    dep.admin("client", "reject", "host2")
    assert _enroll_pending(dep, "host2") == EXIT_REFUSED
    assert _clients(dep)["host2"] == "rejected"
    assert not (dep.agent_dir("host2") / "cert.pem").exists()


def test_single_use_token_signs_one_agent_only(running: Deployment) -> None:
    dep = running
    token = dep.admin("client", "token", "--uses", "1")["token"]
    assert _enroll_pending(dep, "first", token=token) == 0
    # A spent or bogus token is refused with its reason, not parked as a request.
    second = dep.agent("second", "--enroll-wait", "0", "enroll", token=token)
    assert second.returncode == EXIT_REFUSED
    assert "the enrollment token is used up" in second.stderr
    bogus = dep.agent("third", "--enroll-wait", "0", "enroll", token="0" * 48)
    assert bogus.returncode == EXIT_REFUSED
    assert "the enrollment token is unknown" in bogus.stderr
    clients = _clients(dep)
    assert clients["first"] == "accepted"
    assert "second" not in clients and "third" not in clients
    assert not (dep.agent_dir("second") / "cert.pem").exists()
    assert "the enrollment token is used up" in dep.server_log()


def test_job_for_host_and_nested_group_by_granted_user(running: Deployment) -> None:
    dep = running
    dep.enroll("host1")
    dep.enroll("host2")
    dep.admin("group", "create", "A")
    dep.admin("group", "create", "B")
    dep.admin("group", "add", "B", "host2")
    added = dep.admin("group", "add", "A", "@B", "host1")
    assert [a["member"] for a in added] == ["@B", "host1"]
    alice = dep.add_user("alice")
    dep.admin("grant", "add", "alice", "run", "@A")

    group_job = dep.submit("--command", "echo group $SCIRE_JOB_ID", "--group", "A", bundle=alice)
    host_job = dep.submit("--command", "echo host", "--host", "host2", bundle=alice)
    dep.run_agent("host1")
    dep.run_agent("host2")

    job = dep.wait_job(group_job, timeout=10)
    assert job["state"] == "succeeded"
    assert job["owner"] == "alice"
    by_host = _assignments(job)
    assert sorted(by_host) == ["host1", "host2"]
    for a in by_host.values():
        assert a["state"] == "succeeded"
        assert a["output"] == f"group {group_job}\n"

    job = dep.wait_job(host_job, timeout=10)
    assert job["state"] == "succeeded"
    assert [a["client"] for a in job["assignments"]] == ["host2"]
    assert job["assignments"][0]["output"] == "host\n"


def test_jobs_run_in_priority_order(running: Deployment, tmp_path: Path) -> None:
    dep = running
    dep.enroll("host1")
    order = tmp_path / "order.txt"
    ids = [
        dep.submit(
            "--command", f"echo {name} >> {order}", "--host", "host1", "--priority", str(priority)
        )
        for name, priority in (("p1", 1), ("p10", 10), ("p5", 5))
    ]
    dep.run_agent("host1")
    for job_id in ids:
        assert dep.wait_job(job_id, timeout=10)["state"] == "succeeded"
    assert order.read_text().split() == ["p10", "p5", "p1"]


def test_timeout_kills_the_job(running: Deployment, tmp_path: Path) -> None:
    dep = running
    dep.enroll("host1")
    after = tmp_path / "after-sleep"
    job_id = dep.submit(
        "--command", f"sleep 30; touch {after}", "--host", "host1", "--timeout", "1"
    )
    dep.run_agent("host1", timeout=60)
    job = dep.wait_job(job_id, timeout=10)
    assert job["state"] == "timed_out"
    (a,) = job["assignments"]
    assert a["state"] == "timed_out"
    assert a["exit_code"] != 0
    assert not after.exists()


def test_output_capture_and_truncation(running: Deployment) -> None:
    dep = running
    dep.enroll("host1")
    big = dep.submit(
        "--command",
        "head -c 1000 /dev/zero | tr '\\0' x",
        "--host",
        "host1",
        "--output-limit",
        "100",
    )
    small = dep.submit(
        "--command", "printf 'line one\\nline two\\n'; echo err >&2", "--host", "host1"
    )
    dep.run_agent("host1")

    (a,) = dep.wait_job(big, timeout=10)["assignments"]
    assert a["state"] == "succeeded"
    assert a["output_truncated"] is True
    assert 0 < len(a["output"]) <= 100
    assert set(a["output"]) == {"x"}

    (a,) = dep.wait_job(small, timeout=10)["assignments"]
    assert a["state"] == "succeeded"
    assert a["output_truncated"] is False
    assert sorted(a["output"].splitlines()) == ["err", "line one", "line two"]


def test_grant_revoked_after_submission_denies_at_dispatch(
    running: Deployment, tmp_path: Path
) -> None:
    dep = running
    dep.enroll("host1")
    alice = dep.add_user("alice")
    grant_id = dep.admin("grant", "add", "alice", "run", "host1")["id"]
    marker = tmp_path / "ran"
    job_id = dep.submit("--command", f"touch {marker}", "--host", "host1", bundle=alice)
    dep.admin("grant", "remove", str(grant_id))

    dep.run_agent("host1")
    job = dep.wait_job(job_id, timeout=10)
    assert job["state"] == "denied"
    (a,) = job["assignments"]
    assert a["state"] == "denied"
    events = dep.admin("audit", "--job", str(job_id))
    denies = [e for e in events if e["action"] == "deny"]
    assert denies and denies[0]["client"] == "host1" and denies[0]["new_state"] == "denied"
    assert not marker.exists()
    assert not (dep.agent_dir("host1") / "spool" / str(job_id)).exists()


def test_submission_acl(running: Deployment) -> None:
    dep = running
    dep.enroll("host1")
    dep.enroll("host2")
    bob = dep.add_user("bob")

    error = dep.admin_fails("job", "submit", "--command", "true", "--host", "host1", bundle=bob)
    assert "host1" in error
    assert dep.admin("job", "list", bundle=bob) == []

    dep.admin("grant", "add", "bob", "run", "host1")
    # Some targets refused: the job is made, and the exit code says so (6, issue 11).
    proc = dep.admin_run(
        "job", "submit", "--command", "true", "--host", "host1", "--host", "host2", bundle=bob
    )
    assert proc.returncode == 6, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["accepted"] == ["host1"]
    assert len(answer["refused"]) == 1 and "host2" in answer["refused"][0]
    job = dep.job(int(answer["job_id"]))
    assert [a["client"] for a in job["assignments"]] == ["host1"]


def test_spooled_documents_match_the_schemas(running: Deployment) -> None:
    dep = running
    dep.enroll("host1")
    job_id = dep.submit("--command", "echo 'x < y & z'", "--host", "host1", "--priority", "7")
    dep.run_agent("host1")
    assert dep.wait_job(job_id, timeout=10)["state"] == "succeeded"

    entry = dep.agent_dir("host1") / "spool" / str(job_id)
    for document, schema_file in (("job.xml", "job.xsd"), ("result.xml", "status.xsd")):
        schema = etree.XMLSchema(etree.parse(str(SCHEMA_DIR / schema_file)))
        tree = etree.parse(str(entry / document))
        assert schema.validate(tree), f"{document}: {schema.error_log}"
    job_root = etree.parse(str(entry / "job.xml")).getroot()
    assert job_root.get("id") == str(job_id)
    assert job_root.findtext("{urn:scire:job:1}priority") == "7"
    status_root = etree.parse(str(entry / "result.xml")).getroot()
    assert status_root.findtext("{urn:scire:status:1}state") == "succeeded"
    output = status_root.find("{urn:scire:status:1}output")
    assert output is not None and output.get("encoding") == "base64"  # byte-exact on the wire
    assert base64.b64decode(output.text or "") == b"x < y & z\n"
