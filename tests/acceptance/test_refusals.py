"""Refusals at the wire: callers without a certificate, with a certificate from
another CA, revoked agents, agents reporting on jobs they do not hold, hostile
or malformed status documents, and non-admin users calling admin methods.

The tests speak XML-RPC to a real server with ``xmlrpc.client`` and TLS
contexts from ``scire_schema.tls``, as an agent or an intruder would.
"""

from __future__ import annotations

import http.client
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment

from scire_schema import certs, documents, files, tls
from scire_schema.documents import StatusReport
from scire_server import ca

FAULT_AUTHENTICATION = 1
FAULT_FORBIDDEN = 2
FAULT_INVALID_DOCUMENT = 5
FAULT_NOT_HELD = 6


class Wire:
    """XML-RPC proxies to one deployment, each closed at the end of the test."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.proxies: list[xmlrpc.client.ServerProxy] = []

    def proxy(self, cert: Path | None = None, key: Path | None = None) -> Any:
        """A proxy that trusts the deployment's CA and presents ``cert``, if any."""
        context = tls.client_context(self.dep.state_dir / "ca.pem", cert, key)
        proxy = xmlrpc.client.ServerProxy(
            self.dep.url, transport=xmlrpc.client.SafeTransport(context=context), allow_none=True
        )
        self.proxies.append(proxy)
        return proxy

    def agent(self, name: str) -> Any:
        """A proxy with the certificate and key of an enrolled agent's state directory."""
        state = self.dep.agent_dir(name)
        return self.proxy(state / "cert.pem", state / "key.pem")

    def close(self) -> None:
        for proxy in self.proxies:
            proxy("close")()


@pytest.fixture
def wire(running: Deployment) -> Iterator[Wire]:
    w = Wire(running)
    try:
        yield w
    finally:
        w.close()


def _fault(call: Any, *args: Any) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


def _sent_job(dep: Deployment, wire: Wire) -> tuple[int, str]:
    """host1 and host2 enrolled; a job for host1 only, polled by host1 (state sent).
    Returns (job id, delivery id)."""
    dep.enroll("host1")
    dep.enroll("host2")
    job_id = dep.submit("--command", "echo never", "--host", "host1")
    answer = wire.agent("host1").agent.poll([], [], 10)
    (xml,) = answer["jobs"]
    doc = documents.parse_job(xml)
    assert doc.job_id == job_id
    assert dep.job(job_id)["assignments"][0]["state"] == "sent"
    return job_id, doc.delivery_id


def test_no_certificate_only_enrollment_methods(running: Deployment, wire: Wire) -> None:
    dep = running
    anonymous = wire.proxy()
    assert (
        certs.fingerprint(certs.load_cert(anonymous.agent.ca_certificate())) == dep.ca_fingerprint
    )
    csr = certs.make_csr(certs.generate_key(), "newcomer").decode()
    assert anonymous.agent.register("newcomer", csr, {}, "")["status"] == "pending"

    assert _fault(anonymous.agent.poll, [], [], 10).faultCode == FAULT_AUTHENTICATION
    assert _fault(anonymous.admin.job_list).faultCode == FAULT_AUTHENTICATION


def test_certificate_from_another_ca_cannot_connect(
    running: Deployment, wire: Wire, tmp_path: Path
) -> None:
    dep = running
    dep.enroll("host1")
    ca_key, ca_cert = ca.create_ca("Intruder CA")
    key = certs.generate_key()
    cert = ca.issue_certificate(ca_key, ca_cert, key.public_key(), "host1", ca.ROLE_CLIENT)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    files.write_public(cert_file, certs.cert_to_pem(cert))
    files.write_private(key_file, certs.key_to_pem(key))

    intruder = wire.proxy(cert_file, key_file)
    with pytest.raises((OSError, http.client.HTTPException)):
        intruder.agent.poll([], [], 10)
    with pytest.raises((OSError, http.client.HTTPException)):
        intruder.admin.job_list()


def test_revoked_agent_is_refused(running: Deployment, wire: Wire) -> None:
    dep = running
    dep.enroll("host1")
    job_id = dep.submit("--command", "echo never", "--host", "host1")
    dep.admin("client", "revoke", "host1")

    assert _fault(wire.agent("host1").agent.poll, [], [], 10).faultCode == FAULT_FORBIDDEN
    proc = dep.agent("host1", "run")
    assert proc.returncode != 0
    assert dep.job(job_id)["assignments"][0]["state"] == "pending"


def test_report_on_another_agents_job(running: Deployment, wire: Wire) -> None:
    dep = running
    job_id, delivery = _sent_job(dep, wire)
    before = dep.job(job_id)

    report = StatusReport(
        job_id=job_id, delivery_id=delivery, state="succeeded", exit_code=0, output="forged\n"
    )
    fault = _fault(wire.agent("host2").agent.report, documents.render_status(report))
    assert fault.faultCode == FAULT_NOT_HELD

    events = dep.admin("audit", "--client", "host2")
    assert any(e["action"] == "refused" and "agent.report" in (e["detail"] or "") for e in events)
    assert dep.job(job_id) == before


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("<status", id="malformed"),
        pytest.param("wrong-state", id="schema-invalid-state"),
        pytest.param(
            '<?xml version="1.0"?>\n<!DOCTYPE status [<!ENTITY x "succeeded">]>\n'
            '<status xmlns="urn:scire:status:1" job="{job}" delivery="{delivery}">'
            "<state>&x;</state></status>",
            id="doctype-entity",
        ),
        pytest.param(
            '<?xml version="1.0"?>\n<!DOCTYPE lol [<!ENTITY a "aaaaaaaaaa">'
            '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
            '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>\n'
            '<status xmlns="urn:scire:status:1" job="{job}" delivery="{delivery}">'
            '<state>succeeded</state><output truncated="false">&c;</output></status>',
            id="entity-expansion",
        ),
    ],
)
def test_bad_status_documents_change_nothing(running: Deployment, wire: Wire, payload: str) -> None:
    dep = running
    job_id, delivery = _sent_job(dep, wire)
    before = dep.job(job_id)
    if payload == "wrong-state":
        xml = documents.render_status(
            StatusReport(job_id=job_id, delivery_id=delivery, state="exploded", exit_code=0)
        )
    else:
        xml = payload.format(job=job_id, delivery=delivery)

    fault = _fault(wire.agent("host1").agent.report, xml)
    assert fault.faultCode == FAULT_INVALID_DOCUMENT
    assert dep.job(job_id) == before
    events = dep.admin("audit", "--client", "host1")
    assert any(e["action"] == "refused" and "fault 5" in (e["detail"] or "") for e in events)


def test_non_admin_user_cannot_administer(running: Deployment, wire: Wire) -> None:
    dep = running
    assert dep.agent("host1", "--enroll-wait", "0", "enroll").returncode == 3
    alice = dep.add_user("alice")

    for args in (
        ("client", "accept", "host1"),
        ("grant", "add", "alice", "run", "host1"),
        ("user", "list"),
        ("audit",),
    ):
        error = dep.admin_fails(*args, bundle=alice)
        assert "administrator" in error, error
    assert {c["name"]: c["status"] for c in dep.admin("client", "list")}["host1"] == "pending"
    assert dep.admin("grant", "list") == []

    # The same refusal straight from the wire: fault 2 (forbidden). The bundle
    # holds key, certificate and CA in one PEM file.
    fault = _fault(wire.proxy(alice, alice).admin.client_accept, "host1")
    assert fault.faultCode == FAULT_FORBIDDEN


def test_revoked_agent_refusal_is_audited(running: Deployment, wire: Wire) -> None:
    dep = running
    dep.enroll("host1")
    dep.admin("client", "revoke", "host1")

    fault = _fault(wire.agent("host1").agent.poll, [], [], 10)
    assert fault.faultCode == FAULT_FORBIDDEN
    assert fault.faultString == "certificate refused: client host1 is revoked"
    refused = [e for e in dep.admin("audit") if e["action"] == "refused"]
    assert refused[-1]["actor"] == "client:host1"
    assert refused[-1]["client"] == "host1"
    assert refused[-1]["detail"] == (
        "agent.poll: fault 2: certificate refused: client host1 is revoked"
    )
