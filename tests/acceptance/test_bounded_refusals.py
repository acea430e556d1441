"""Hostile input changes the log and the audit trail by a bounded amount: a huge
name costs a short fault and a short log line; refusals of strangers are
rate-limited in the log and summed up in one audit row per interval instead of
one row each; a revoked identity is named as itself.

Real server, real TLS; the stranger speaks XML-RPC without a certificate.
"""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment

from scire_schema import certs, tls
from scire_schema.protocol import FaultCode

FAULT_AUTHENTICATION = 1
FAULT_FORBIDDEN = 2
FAULT_INVALID_ARGUMENT = 4


def _proxy(dep: Deployment, bundle: Path | None = None) -> Any:
    context = tls.client_context(dep.state_dir / "ca.pem", bundle, bundle)
    return xmlrpc.client.ServerProxy(
        dep.url, transport=xmlrpc.client.SafeTransport(context=context), allow_none=True
    )


def _fault(call: Any, *args: Any) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


def _server_with_summaries_every(dep: Deployment, seconds: int) -> None:
    config = dep.root / "server.ini"
    config.write_text(f"[server]\nrefusal_summary_interval = {seconds}\n")
    dep.start_server("server", "-c", str(config))


@pytest.fixture
def stranger(running: Deployment) -> Iterator[Any]:
    proxy = _proxy(running)
    try:
        yield proxy
    finally:
        proxy("close")()


def test_a_huge_name_gets_a_short_fault_and_a_short_log_line(
    running: Deployment, stranger: Any
) -> None:
    dep = running
    log_before = len(dep.server_log())
    csr = certs.make_csr(certs.generate_key(), "web-1").decode()
    # A stranger's body is capped well below an agent's: 31 MiB never reaches a method.
    # (413 at once; a client still sending its body may see the connection cut instead.)
    with pytest.raises((xmlrpc.client.ProtocolError, OSError)) as too_large:
        stranger.agent.register("n" * (31 * 1024 * 1024), csr, {}, "")
    if isinstance(too_large.value, xmlrpc.client.ProtocolError):
        assert too_large.value.errcode == 413

    name = "n" * 50_000  # under that cap: the method refuses it, in a few words
    fault = _fault(stranger.agent.register, name, csr, {}, "")
    assert fault.faultCode == FAULT_INVALID_ARGUMENT
    assert len(fault.faultString) < 300
    assert f"({len(name)} characters)" in fault.faultString

    # The listener's parser bounds a method name before any method is looked up.
    fault = _fault(getattr(stranger, "m" * 50_000))
    assert fault.faultCode == FaultCode.MALFORMED_REQUEST
    assert len(fault.faultString) < 300

    # Both calls came from one address: one log line, short, for the first.
    # The stranger is anonymous, so the second refusal is only counted.
    dep.admin("client", "list")  # a call after both: their log lines are written
    grown = dep.server_log()[log_before:]
    assert len(grown) < 4096, grown[:4096]
    assert max(len(line) for line in grown.splitlines()) < 1000
    assert grown.count("anonymous@127.0.0.1 refused agent.register") == 1


def test_anonymous_refusals_are_counted_not_written_one_by_one(deployment: Deployment) -> None:
    dep = deployment
    _server_with_summaries_every(dep, 3600)  # no summary before the daemon stops
    audit_before = len(dep.admin("audit", "--limit", "1000"))
    stranger = _proxy(dep)
    csr = certs.make_csr(certs.generate_key(), "web-1").decode()
    for _ in range(25):
        assert _fault(stranger.agent.poll, [], [], 10).faultCode == FAULT_AUTHENTICATION
    for _ in range(5):
        fault = _fault(stranger.agent.register, "bad name!", csr, {}, "")
        assert fault.faultCode == FAULT_INVALID_ARGUMENT
    stranger("close")()

    assert len(dep.admin("audit", "--limit", "1000")) == audit_before
    log = dep.server_log()
    assert log.count("anonymous@127.0.0.1 refused") == 1
    assert "further anonymous refusals from 127.0.0.1 are counted" in log

    # The daemon sums up the last interval as it stops: one line, one row.
    dep.stop_server()
    log = dep.server_log()
    assert "30 anonymous refusal(s) from 1 address(es) since " in log
    assert "29 not logged one by one; most from 127.0.0.1 (30)" in log
    dep.start_server()
    rows = [e for e in dep.admin("audit", "--limit", "1000") if e["actor"] == "anonymous"]
    assert [(e["action"], e["detail"].split(" since ")[0]) for e in rows] == [
        ("anonymous_refusals", "30 anonymous refusal(s) from 1 address(es)")
    ]
    assert all(not e["actor"].startswith("anonymous@") for e in dep.admin("audit"))


def test_the_summary_row_comes_every_interval(deployment: Deployment) -> None:
    dep = deployment
    _server_with_summaries_every(dep, 1)
    stranger = _proxy(dep)
    for _ in range(3):
        assert _fault(stranger.admin.job_list).faultCode == FAULT_AUTHENTICATION
    stranger("close")()
    deadline = time.monotonic() + 60
    while True:
        rows = [e for e in dep.admin("audit") if e["action"] == "anonymous_refusals"]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [r["detail"].split(" since ")[0] for r in rows] == [
        "3 anonymous refusal(s) from 1 address(es)"
    ]


def test_a_revoked_identity_is_named_as_itself(running: Deployment) -> None:
    dep = running
    dep.enroll("host1")
    dep.admin("client", "revoke", "host1")
    bob = dep.add_user("bob")
    dep.admin("user", "revoke", "bob")
    state = dep.agent_dir("host1")

    agent_context = tls.client_context(
        dep.state_dir / "ca.pem", state / "cert.pem", state / "key.pem"
    )
    agent = xmlrpc.client.ServerProxy(
        dep.url, transport=xmlrpc.client.SafeTransport(context=agent_context)
    )
    for _ in range(2):
        assert _fault(agent.agent.poll, [], [], 10).faultCode == FAULT_FORBIDDEN
    assert _fault(_proxy(dep, bob).admin.whoami).faultCode == FAULT_FORBIDDEN

    refused = [e for e in dep.admin("audit") if e["action"] == "refused"]
    assert [(e["actor"], e["client"]) for e in refused] == [
        ("client:host1", "host1"),
        ("client:host1", "host1"),
        ("user:bob", None),
    ]
    log = dep.server_log()
    assert (
        log.count("client:host1 refused agent.poll: certificate refused: client host1 is revoked")
        == 2
    )
    assert "user:bob refused admin.whoami: certificate refused: user bob is revoked" in log
    assert "anonymous@" not in log
