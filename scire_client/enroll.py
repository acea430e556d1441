"""Enrollment: from an empty state directory to a key and a certificate from the CA.

1. The CA: the operator's copy at ``ca_file``, or fetched from the server
   over an unverified connection and accepted only if its SHA-256 DER
   fingerprint equals ``ca_fingerprint`` -- never by blind trust.
2. A key (``key.pem``, mode 0600) and a CSR (``csr.pem``), both kept, so a
   restarted agent asks again with the same request instead of piling up new
   ones for the administrator. The key's fingerprint is logged (and shown by
   ``scire-client enroll``): the administrator compares it with the one
   ``scire-admin client list`` shows before accepting, as with ``salt-key -f``.
3. ``register`` (with the enrollment token, if any), then
   ``fetch_certificate`` until it is accepted, ``enroll_wait`` runs out, or
   the request is refused.
"""

from __future__ import annotations

import logging
import platform
import socket
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from scire_client.config import ClientConfig
from scire_client.exceptions import (
    ConfigError,
    EnrollmentPending,
    EnrollmentRefused,
    ServerFault,
    TransportError,
)
from scire_client.transport import ServerTransport
from scire_schema import certs, files, tls
from scire_schema.errors import CertificateError
from scire_schema.protocol import REFUSED_STATUSES, EnrollmentStatus, FaultCode

log = logging.getLogger(__name__)

FETCH_INTERVAL = 2.0  # seconds between fetch_certificate calls while the request is pending


def is_enrolled(config: ClientConfig) -> bool:
    return config.cert_file.exists()


def host_facts() -> dict[str, str]:
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def ensure_enrolled(
    config: ClientConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_request: Callable[[str], None] | None = None,
) -> bool:
    """Enroll unless ``cert.pem`` exists; True when this call enrolled the agent.

    ``on_request`` gets the request's key fingerprint before it is sent.
    Raises EnrollmentPending when an administrator still has to accept the
    request, EnrollmentRefused when it was rejected or revoked.
    """
    if is_enrolled(config):
        if not config.key_file.exists():
            raise ConfigError(f"{config.cert_file} exists but its key {config.key_file} does not")
        return False
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ensure_ca(config)
    key = _load_or_make_key(config)
    csr_pem = _load_or_make_csr(config, key)
    key_fingerprint = certs.key_fingerprint(key)
    log.info(
        "client %s: enrollment request for key %s; the administrator should see the same "
        "fingerprint in 'scire-admin client list' before accepting",
        config.name,
        key_fingerprint,
    )
    if on_request is not None:
        on_request(key_fingerprint)
    transport = ServerTransport(config)  # trusts the CA; no client certificate yet
    try:
        name = _register(transport, config, csr_pem)
        certificate = _wait_for_certificate(transport, config, name, csr_pem, sleep, clock)
    finally:
        transport.close()
    cert = check_certificate(config, key, certificate)
    files.write_public(config.cert_file, certs.cert_to_pem(cert))
    log.info(
        "client %s: enrolled, certificate %s (fingerprint %s)",
        name,
        config.cert_file,
        certs.fingerprint(cert),
    )
    return True


def ensure_ca(config: ClientConfig) -> None:
    """Make sure ``ca_file`` holds the CA, fetching and checking it if it does not."""
    if config.ca_path.exists():
        if config.ca_fingerprint:
            actual = certs.fingerprint(_load_cert(config.ca_path.read_bytes(), str(config.ca_path)))
            if actual != config.ca_fingerprint:
                raise ConfigError(
                    f"the CA in {config.ca_path} has fingerprint {actual}, "
                    f"not the configured {config.ca_fingerprint}"
                )
        return
    if not config.ca_fingerprint:
        raise ConfigError("no CA file and no ca_fingerprint to check a fetched CA")
    transport = ServerTransport(config, tls.client_context(None))
    try:
        pem = transport.ca_certificate()
        server = transport.current_server
    finally:
        transport.close()
    cert = _load_cert(pem, f"the CA sent by {server}")
    actual = certs.fingerprint(cert)
    if actual != config.ca_fingerprint:
        raise ConfigError(
            f"the CA sent by {server} has fingerprint {actual}, "
            f"not the configured {config.ca_fingerprint}: refusing it"
        )
    # Write the checked certificate re-encoded, not the server's text, so
    # nothing unchecked (a second PEM block) ends up trusted.
    files.write_public(config.ca_path, certs.cert_to_pem(cert))
    log.info("CA %s fetched from %s and checked (fingerprint %s)", config.ca_path, server, actual)


def _load_cert(pem: str | bytes, what: str) -> x509.Certificate:
    try:
        return certs.load_cert(pem)
    except CertificateError as exc:
        raise ConfigError(f"{what} is not a PEM certificate") from exc


def _load_or_make_key(config: ClientConfig) -> certs.PrivateKey:
    if config.key_file.exists():
        try:
            return certs.load_key(config.key_file.read_bytes())
        except CertificateError as exc:
            raise ConfigError(f"{config.key_file} is not an EC private key: {exc}") from exc
    key = certs.generate_key()
    files.write_private(config.key_file, certs.key_to_pem(key))
    log.info("client %s: new key %s", config.name, config.key_file)
    return key


def _load_or_make_csr(config: ClientConfig, key: certs.PrivateKey) -> str:
    """The kept request if it is for this key and name, else a new one."""
    if config.csr_file.exists():
        try:
            csr = certs.load_csr(config.csr_file.read_bytes())
        except CertificateError as exc:
            log.warning(
                "client %s: %s is unusable (%s): making a new one",
                config.name,
                config.csr_file,
                exc,
            )
        else:
            if certs.same_key(csr.public_key(), key) and certs.common_name(csr) == config.name:
                return config.csr_file.read_text(encoding="ascii")
    pem = certs.make_csr(key, config.name)
    files.write_public(config.csr_file, pem)
    return pem.decode("ascii")


def _register(transport: ServerTransport, config: ClientConfig, csr_pem: str) -> str:
    try:
        answer = transport.register(config.name, csr_pem, host_facts(), config.enrollment_token)
    except ServerFault as exc:
        if exc.code == FaultCode.ENROLLMENT_REFUSED:
            raise EnrollmentRefused(
                f"enrollment of {config.name} refused: {exc.fault_message}"
            ) from exc
        if exc.code != FaultCode.CONFLICT:  # a request for this name exists already
            raise
        # A restarted agent registering its kept request again: go on to fetch.
        log.info("client %s: request already registered (%s)", config.name, exc.fault_message)
        return config.name
    if answer.status in REFUSED_STATUSES:
        raise EnrollmentRefused(f"enrollment of {answer.name} {answer.status} by an administrator")
    if answer.name != config.name:
        log.warning("client %s: the server registered the name %s", config.name, answer.name)
    log.info("client %s: registered, %s", answer.name, answer.status)
    return answer.name


def _wait_for_certificate(
    transport: ServerTransport,
    config: ClientConfig,
    name: str,
    csr_pem: str,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> str:
    deadline = clock() + config.enroll_wait
    while True:
        try:
            answer = transport.fetch_certificate(name, csr_pem)
        except ServerFault as exc:
            if exc.code == FaultCode.ENROLLMENT_REFUSED:
                raise EnrollmentRefused(
                    f"enrollment of {name} refused: {exc.fault_message}"
                ) from exc
            raise
        if answer.status == EnrollmentStatus.ACCEPTED:
            if not answer.certificate:
                raise TransportError("fetch_certificate said accepted but sent no certificate")
            return answer.certificate
        if answer.status in REFUSED_STATUSES:
            raise EnrollmentRefused(f"enrollment of {name} {answer.status} by an administrator")
        remaining = deadline - clock()
        if remaining <= 0:
            raise EnrollmentPending(
                f"waiting for an administrator: scire-admin client accept {name}"
            )
        sleep(min(FETCH_INTERVAL, remaining))


def check_certificate(config: ClientConfig, key: certs.PrivateKey, pem: str) -> x509.Certificate:
    """The certificate must carry our key and be signed by the CA we trust."""
    cert = _load_cert(pem, "the certificate sent by the server")
    if not certs.same_key(cert.public_key(), key):
        raise TransportError("the server sent a certificate for another key")
    ca = _load_cert(config.ca_path.read_bytes(), str(config.ca_path))
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TransportError(
            f"the server sent a certificate not issued by our CA: {exc!r}"
        ) from exc
    return cert
