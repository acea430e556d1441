"""Certificate renewal end to end: an agent (``scire-client renew``, and a daemon
by itself within ``renew_before`` days of expiry) and an administrator
(``scire-admin cert renew``). The new certificate works at once, the old one is
refused from then on, the pusher reaches a renewed daemon, and nobody renews
under another's name. Real server, real agents, real TLS."""

from __future__ import annotations

import shutil
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment, wait_for
from test_daemon import HOST, DaemonRig

from scire_schema import certs, tls


def fingerprint(path: Path) -> str:
    return certs.fingerprint(certs.load_cert(path.read_bytes()))


def agent_proxy(dep: Deployment, cert: Path, key: Path) -> Any:
    context = tls.client_context(dep.state_dir / "ca.pem", cert, key)
    return xmlrpc.client.ServerProxy(
        dep.url, transport=tls.TLSTransport(context, 30), allow_none=True
    )


def keep_copy(directory: Path, *names: str) -> list[Path]:
    copies = []
    for name in names:
        copy = directory.parent / f"{directory.name}-old-{name}"
        shutil.copy2(directory / name, copy)
        copies.append(copy)
    return copies


def test_agent_renews_the_new_cert_works_the_old_is_refused(running: Deployment) -> None:
    dep = running
    dep.enroll("r1")
    state = dep.agent_dir("r1")
    old_cert, old_key = keep_copy(state, "cert.pem", "key.pem")
    proc = dep.agent("r1", "renew")
    assert proc.returncode == 0, proc.stderr
    assert f"renewed r1: {state / 'cert.pem'}" in proc.stdout
    new = fingerprint(state / "cert.pem")
    assert new != fingerprint(old_cert) and new in proc.stdout
    assert not (state / "renew-key.pem").exists() and not (state / "renewed.pem").exists()
    # The new certificate works at once: a job runs with it.
    job = dep.submit("--host", "r1", "--command", "echo renewed")
    dep.run_agent("r1")
    assert dep.job(job)["assignments"][0]["output"] == "renewed\n"
    # The old one is refused from then on (an unknown certificate: fault 1).
    with pytest.raises(xmlrpc.client.Fault) as refused:
        agent_proxy(dep, old_cert, old_key).agent.poll([], [], 0)
    assert refused.value.faultCode == 1
    # A request for another name is refused, and nothing changes.
    other = certs.make_csr(certs.generate_key(), "someone-else").decode()
    with pytest.raises(xmlrpc.client.Fault) as wrong:
        agent_proxy(dep, state / "cert.pem", state / "key.pem").agent.renew_certificate(other)
    assert wrong.value.faultCode == 4 and "is not 'r1'" in wrong.value.faultString
    assert fingerprint(state / "cert.pem") == new
    show = dep.admin("client", "show", "r1")
    assert show["fingerprint"] == new
    events = dep.admin("audit", "--client", "r1")
    assert any(e["action"] == "certificate_renew" for e in events)
    assert any(
        e["action"] == "refused" and "renew_certificate" in (e["detail"] or "") for e in events
    )
    assert "client:r1: certificate renewed" in dep.server_log()


def test_admin_renews_their_bundle(running: Deployment) -> None:
    dep = running
    alice = dep.add_user("alice")
    old = dep.root / "alice-old.pem"
    shutil.copy2(alice, old)
    answer = dep.admin("cert", "renew", bundle=alice)
    assert answer["name"] == "alice" and answer["bundle"] == str(alice)
    assert answer["fingerprint"] == fingerprint(alice) != fingerprint(old)
    assert alice.stat().st_mode & 0o777 == 0o600
    assert dep.admin("grant", "list", bundle=alice) == []
    assert "not known" in dep.admin_fails("grant", "list", bundle=old)
    # The root administrator too, with the default flow.
    before = fingerprint(dep.bundle)
    dep.admin("cert", "renew")
    assert fingerprint(dep.bundle) != before
    assert "alice" in [u["name"] for u in dep.admin("user", "list")]
    actions = [(e["actor"], e["action"]) for e in dep.admin("audit", "--limit", "50")]
    assert ("user:alice", "certificate_renew") in actions


def test_daemon_renews_by_itself_and_the_push_still_reaches_it(deployment: Deployment) -> None:
    rig = DaemonRig(deployment)
    try:
        # 825-day certificates: renew_before = 1000 days makes the first check renew.
        rig.enroll(HOST, renew_before=1000)
        state = deployment.agent_dir(HOST)
        before = fingerprint(state / "cert.pem")
        rig.start()
        wait_for(lambda: "certificate renewed" in rig.log(HOST), 30, "the daemon to renew")
        after = fingerprint(state / "cert.pem")
        assert after != before
        wait_for(
            lambda: any(
                c["name"] == HOST and c["agent_mode"] == "daemon" and c["callback_address"]
                for c in deployment.admin("client", "list")
            ),
            30,
            "the server to learn the callback",
        )
        # Poll interval 300 s: only a push, pinned to the renewed fingerprint, runs it now.
        job = rig.submit("--command", "echo pushed after renewal")
        row = rig.wait_final(job)
        assert (row["state"], row["output"]) == ("succeeded", "pushed after renewal\n")
    finally:
        rig.close()
