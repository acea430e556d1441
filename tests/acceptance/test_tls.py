"""TLS settings end to end: the agent and scire-admin check the server's name
against its certificate, and expired certificates are refused in words."""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
from pathlib import Path

import pytest
from conftest import Deployment

from scire_client.config import ClientConfig
from scire_client.exceptions import TransportError
from scire_client.transport import ServerTransport
from scire_schema import certs, tls
from scire_schema.protocol import utc_now
from scire_server import ca


def _issue_expired(dep: Deployment, key_file: Path, cn: str, role: str, names: list[str]) -> bytes:
    """A certificate for the key in ``key_file``, signed by the deployment's CA,
    that expired a day ago."""
    ca_key = certs.load_key((dep.state_dir / "ca.key").read_bytes())
    ca_cert = certs.load_cert((dep.state_dir / "ca.pem").read_bytes())
    key = certs.load_key(key_file.read_bytes())
    cert = ca.issue_certificate(
        ca_key,
        ca_cert,
        key.public_key(),  # type: ignore[arg-type]
        cn,
        role,
        names,
        days=9,
        not_before=utc_now() - dt.timedelta(days=10),
    )
    return certs.cert_to_pem(cert)


def test_contexts_want_tls_1_2_no_compression_and_the_host_name(deployment: Deployment) -> None:
    state = deployment.state_dir
    server = tls.server_context(state / "server.pem", state / "server.key", state / "ca.pem")
    client = tls.client_context(state / "ca.pem")
    for context in (server, client, tls.client_context(None)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
    assert client.check_hostname is True
    assert client.verify_mode == ssl.CERT_REQUIRED


def test_an_agent_naming_a_host_the_certificate_lacks_is_refused(deployment: Deployment) -> None:
    dep = deployment
    dep.start_server()
    dep.enroll("web1")
    dep.stop_server()
    # The certificate names localhost and 127.0.0.1; 127.0.0.2 reaches the same server.
    dep.start_server("server", "--listen-host", "127.0.0.2")
    other = f"https://127.0.0.2:{dep.port}/"
    args = dep.agent_args("web1", "run")
    args[args.index(dep.url)] = other
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "the server's certificate does not name 127.0.0.2" in proc.stderr
    assert "CERTIFICATE_VERIFY_FAILED" not in proc.stderr
    # scire-admin checks the name too (its wording is the admin CLI's own).
    refused = dep.admin_run("client", "list", url=other)
    assert refused.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr or "127.0.0.2" in refused.stderr


def test_an_expired_agent_certificate_is_named_as_such(running: Deployment) -> None:
    dep = running
    dep.enroll("web2")
    agent_dir = dep.agent_dir("web2")
    expired = _issue_expired(dep, agent_dir / "key.pem", "web2", ca.ROLE_CLIENT, [])
    (agent_dir / "cert.pem").write_bytes(expired)

    proc = dep.agent("web2", "run")
    assert proc.returncode == 1
    assert "your certificate expired on " in proc.stderr
    assert "; renew or re-enroll" in proc.stderr

    # Were the agent not to look first, the server's refusal is told in words too.
    config = ClientConfig.load(
        None, state_dir=agent_dir, name="web2", servers=[dep.url], ca_fingerprint=""
    )
    context = tls.client_context(config.ca_path, config.cert_file, config.key_file)
    transport = ServerTransport(config, context)
    refusal = "refused our certificate as expired|may have refused our certificate"
    with pytest.raises(TransportError, match=refusal):
        transport.poll([], [], 0)
    transport.close()


def test_an_expired_server_certificate_is_named_as_such(deployment: Deployment) -> None:
    dep = deployment
    dep.start_server()
    dep.enroll("web3")
    dep.stop_server()
    server_cert = dep.state_dir / "server.pem"
    server_cert.write_bytes(
        _issue_expired(
            dep, dep.state_dir / "server.key", "server", ca.ROLE_SERVER, ["localhost", "127.0.0.1"]
        )
    )
    dep.start_server()
    proc = dep.agent("web3", "run")
    assert proc.returncode == 1
    assert "the server's certificate has expired" in proc.stderr
