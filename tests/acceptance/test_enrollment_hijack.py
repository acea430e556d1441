"""A pending enrollment cannot be taken over: the agent shows its key's
fingerprint, the administrator sees the same one and may pin it when
accepting, a stranger's request for the pending name with another key is
refused, and ``agent.fetch_certificate`` tells a stranger nothing.

The agent is the real ``scire-client``; the intruder speaks XML-RPC without a
certificate, as anyone on the network can.
"""

from __future__ import annotations

import http.client
import re
import subprocess
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment

from scire_schema import certs, files, tls
from scire_server import ca

FAULT_AUTHENTICATION = 1
FAULT_NOT_FOUND = 3
FAULT_ENROLLMENT_REFUSED = 9


@pytest.fixture
def anonymous(running: Deployment) -> Iterator[Any]:
    """An XML-RPC proxy that trusts the CA and presents no certificate."""
    context = tls.client_context(running.state_dir / "ca.pem")
    proxy = xmlrpc.client.ServerProxy(
        running.url, transport=xmlrpc.client.SafeTransport(context=context), allow_none=True
    )
    try:
        yield proxy
    finally:
        proxy("close")()


def _fault(call: Any, *args: Any) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


def _printed_fingerprint(stdout: str) -> str:
    match = re.search(r"key fingerprint ([0-9a-f]{64})", stdout)
    assert match, stdout
    return match.group(1)


def _listed(dep: Deployment, name: str) -> dict[str, Any]:
    return next(c for c in dep.admin("client", "list") if c["name"] == name)


def test_a_hijack_of_a_pending_enrollment_fails(
    running: Deployment, anonymous: Any, tmp_path: Path
) -> None:
    dep = running
    proc = dep.agent("web-1", "--enroll-wait", "0", "enroll")
    assert proc.returncode == 3, proc.stderr  # pending
    printed = _printed_fingerprint(proc.stdout)
    agent_key = certs.load_key((dep.agent_dir("web-1") / "key.pem").read_bytes())
    assert printed == certs.key_fingerprint(agent_key)
    assert f"enrollment request for key {printed}" in proc.stderr  # the agent's log line
    assert _listed(dep, "web-1")["key_fingerprint"] == printed
    assert dep.admin("client", "show", "web-1")["key_fingerprint"] == printed

    # The intruder asks for the pending name with its own key: refused, and the
    # administrator still sees the agent's key.
    intruder_key = certs.generate_key()
    intruder_csr = certs.make_csr(intruder_key, "web-1").decode()
    fault = _fault(anonymous.agent.register, "web-1", intruder_csr, {}, "")
    assert fault.faultCode == FAULT_ENROLLMENT_REFUSED
    assert "an administrator must reject or delete that request first" in fault.faultString
    assert _listed(dep, "web-1")["key_fingerprint"] == printed

    # Pinned to the intruder's key, the acceptance accepts nothing.
    error = dep.admin_fails(
        "client", "accept", "web-1", "--fingerprint", certs.key_fingerprint(intruder_key)
    )
    assert "nothing accepted" in error
    assert _listed(dep, "web-1")["status"] == "pending"
    assert dep.admin("client", "accept", "web-1", "--fingerprint", printed)["status"] == (
        "accepted"
    )

    # The intruder gets no certificate, and nothing to poll with.
    fault = _fault(anonymous.agent.fetch_certificate, "web-1", intruder_csr)
    assert fault.faultCode == FAULT_NOT_FOUND
    assert _fault(anonymous.agent.poll, [], [], 10).faultCode == FAULT_AUTHENTICATION
    ca_key, ca_cert = ca.create_ca("Intruder CA")
    forged = ca.issue_certificate(
        ca_key, ca_cert, intruder_key.public_key(), "web-1", ca.ROLE_CLIENT
    )
    files.write_public(tmp_path / "forged.pem", certs.cert_to_pem(forged))
    files.write_private(tmp_path / "forged.key", certs.key_to_pem(intruder_key))
    context = tls.client_context(
        dep.state_dir / "ca.pem", tmp_path / "forged.pem", tmp_path / "forged.key"
    )
    forger = xmlrpc.client.ServerProxy(
        dep.url, transport=xmlrpc.client.SafeTransport(context=context)
    )
    with pytest.raises((OSError, http.client.HTTPException)):
        forger.agent.poll([], [], 10)

    # The agent itself gets its certificate and runs a job.
    proc = dep.agent("web-1", "enroll")
    assert proc.returncode == 0, proc.stderr
    cert = certs.load_cert((dep.agent_dir("web-1") / "cert.pem").read_bytes())
    assert certs.same_key(cert.public_key(), agent_key)
    job_id = dep.submit("--command", "echo mine", "--host", "web-1")
    dep.run_agent("web-1")
    assert dep.wait_job(job_id)["assignments"][0]["output"] == "mine\n"


def test_fetch_certificate_tells_a_stranger_no_names(running: Deployment, anonymous: Any) -> None:
    dep = running
    assert dep.agent("web-1", "--enroll-wait", "0", "enroll").returncode == 3
    stranger_csr = certs.make_csr(certs.generate_key(), "web-1").decode()
    other_key = _fault(anonymous.agent.fetch_certificate, "web-1", stranger_csr)
    no_such_client = _fault(anonymous.agent.fetch_certificate, "no-such-host", stranger_csr)
    assert (other_key.faultCode, other_key.faultString) == (
        no_such_client.faultCode,
        no_such_client.faultString,
    )
    assert other_key.faultCode == FAULT_NOT_FOUND


def test_an_agent_whose_pending_name_has_another_key_is_told_why(running: Deployment) -> None:
    dep = running
    assert dep.agent("web-1", "--enroll-wait", "0", "enroll").returncode == 3
    # Another host (or a reinstalled one, with a new key) under the same name.
    proc = dep.agent_args("web-1", "--enroll-wait", "0", "enroll")
    proc[proc.index("--state-dir") + 1] = str(dep.root / "agents" / "reinstalled")
    result = subprocess.run(proc, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stderr  # refused
    assert "reject or delete that request first" in result.stderr
    # Once the administrator rejects the old request, the new key may ask.
    dep.admin("client", "reject", "web-1")
    result = subprocess.run(proc, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert _listed(dep, "web-1")["key_fingerprint"] == _printed_fingerprint(result.stdout)
