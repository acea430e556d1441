"""Renewal: the agent's own certificate replaced before it expires.

``scire-client renew`` renews at once; the daemon renews by itself when its
certificate is within ``renew_before`` days of expiry (checked at start and
daily). The server identifies the agent by the certificate it calls with,
signs a new request for the same name, and keeps only the new certificate's
fingerprint: the old certificate is refused from then on (docs/SECURITY.md,
"Renewal").

A renewal survives a crash and a lost answer:

1. a new key and request go to ``renew-key.pem`` and ``renew-csr.pem`` first
   (a renewal tried again reuses them);
2. ``agent.renew_certificate``; when no answer comes back the server may have
   switched already, so the certificate is asked for as enrollment does
   (``agent.fetch_certificate`` with the new request: open, no identity needed);
3. the new key and certificate go to ``renewed.pem`` in one atomic write, then
   to ``key.pem``, ``cert.pem`` and ``csr.pem``; ``renewed.pem`` and the
   request files go last. ``finish_interrupted`` and ``resume`` finish steps 3 and 2 at the next start.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from cryptography import x509

from scire_client.config import ClientConfig
from scire_client.enroll import check_certificate
from scire_client.exceptions import ConfigError, ServerFault, TransportError
from scire_client.transport import ServerTransport
from scire_schema import certs, files
from scire_schema.errors import CertificateError
from scire_schema.protocol import EnrollmentStatus

log = logging.getLogger(__name__)

DAY = 86400.0  # seconds between the daemon's checks of its certificate's expiry
RETRY_AFTER_FAILURE = 3600.0  # seconds before a daemon tries a failed renewal again


def _pending_key(config: ClientConfig) -> Path:
    return config.state_dir / "renew-key.pem"


def _pending_csr(config: ClientConfig) -> Path:
    return config.state_dir / "renew-csr.pem"


def _renewed(config: ClientConfig) -> Path:
    return config.state_dir / "renewed.pem"


def expiry(config: ClientConfig) -> dt.datetime:
    """When the agent's certificate expires (UTC)."""
    try:
        return certs.load_cert(config.cert_file.read_bytes()).not_valid_after_utc
    except (OSError, CertificateError) as exc:
        raise ConfigError(f"cannot read the agent's certificate {config.cert_file}: {exc}") from exc


def due(config: ClientConfig, now: dt.datetime) -> bool:
    """True when the certificate expires within ``renew_before`` days (never when 0)."""
    if config.renew_before <= 0:
        return False
    return expiry(config) - now <= dt.timedelta(days=config.renew_before)


def renew(config: ClientConfig, transport: ServerTransport) -> x509.Certificate:
    """Renew the agent's certificate now and install the new one; ``transport``
    presents it from the next call on."""
    key, csr_pem = _pending_request(config)
    try:
        pem = transport.renew_certificate(csr_pem)
    except TransportError as exc:
        # The server may have renewed and the answer got lost: then the old
        # certificate is refused from now on, and only the new request fetches it.
        fetched = _fetch(config, transport, csr_pem)
        if fetched is None:
            raise TransportError(f"renewal not confirmed: {exc}") from exc
        pem = fetched
        log.info("client %s: renewal answer lost; certificate fetched", config.name)
    cert = _install(config, key, csr_pem, pem)
    transport.reload_identity(config)
    return cert


def finish_interrupted(config: ClientConfig) -> bool:
    """Install what a renewal cut short after its answer left in ``renewed.pem``
    (before any connection: ``key.pem`` and ``cert.pem`` may not match till then);
    True when it did."""
    renewed = _renewed(config)
    if not renewed.exists():
        return False
    text = renewed.read_bytes()
    try:
        key = certs.load_key(text)
        cert = certs.load_cert(text)
    except CertificateError as exc:
        raise ConfigError(f"{renewed} is damaged: {exc}; remove it and renew again") from exc
    _apply(config, certs.key_to_pem(key), certs.cert_to_pem(cert), _read_csr(config))
    log.info("client %s: finished an interrupted renewal", config.name)
    return True


def resume(config: ClientConfig, transport: ServerTransport) -> bool:
    """Fetch the answer of a renewal whose answer was lost; True when it
    installed a certificate. A request the server never signed is kept for the
    next renewal."""
    if not (_pending_key(config).exists() and _pending_csr(config).exists()):
        return False
    csr_pem = _pending_csr(config).read_text(encoding="ascii")
    try:
        pem = _fetch(config, transport, csr_pem)
    except TransportError as exc:
        log.warning("client %s: cannot check an unfinished renewal: %s", config.name, exc)
        return False
    if pem is None:
        return False
    key = certs.load_key(_pending_key(config).read_bytes())
    _install(config, key, csr_pem, pem)
    log.info("client %s: renewal answer fetched after a restart", config.name)
    transport.reload_identity(config)
    return True


def _pending_request(config: ClientConfig) -> tuple[certs.PrivateKey, str]:
    key_file, csr_file = _pending_key(config), _pending_csr(config)
    if key_file.exists() and csr_file.exists():
        try:
            return certs.load_key(key_file.read_bytes()), csr_file.read_text(encoding="ascii")
        except (CertificateError, ValueError) as exc:
            log.warning("client %s: unusable renewal request (%s): a new one", config.name, exc)
    key = certs.generate_key()
    csr_pem = certs.make_csr(key, config.name)
    files.write_private(key_file, certs.key_to_pem(key))
    files.write_public(csr_file, csr_pem)
    log.info("client %s: renewal request for new key %s", config.name, certs.key_fingerprint(key))
    return key, csr_pem.decode("ascii")


def _fetch(config: ClientConfig, transport: ServerTransport, csr_pem: str) -> str | None:
    """The certificate the server keeps for this request, if it signed it."""
    try:
        answer = transport.fetch_certificate(config.name, csr_pem)
    except ServerFault:
        return None  # not the request on record: the server did not renew
    if answer.status != EnrollmentStatus.ACCEPTED or not answer.certificate:
        return None
    return answer.certificate


def _install(
    config: ClientConfig, key: certs.PrivateKey, csr_pem: str, pem: str
) -> x509.Certificate:
    cert = check_certificate(config, key, pem)
    if certs.common_name(cert) != config.name:
        raise TransportError(
            f"the server sent a certificate for {certs.common_name(cert)!r}, not {config.name!r}"
        )
    key_pem, cert_pem = certs.key_to_pem(key), certs.cert_to_pem(cert)
    files.write_private(_renewed(config), key_pem + cert_pem)
    _apply(config, key_pem, cert_pem, csr_pem.encode("ascii"))
    log.info(
        "client %s: certificate renewed (fingerprint %s, valid until %s UTC)",
        config.name,
        certs.fingerprint(cert),
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}",
    )
    return cert


def _read_csr(config: ClientConfig) -> bytes | None:
    try:
        return _pending_csr(config).read_bytes()
    except FileNotFoundError:
        return None


def _apply(config: ClientConfig, key_pem: bytes, cert_pem: bytes, csr_pem: bytes | None) -> None:
    files.write_private(config.key_file, key_pem)
    files.write_public(config.cert_file, cert_pem)
    if csr_pem is not None:
        files.write_public(config.csr_file, csr_pem)
    for path in (_pending_key(config), _pending_csr(config), _renewed(config)):
        path.unlink(missing_ok=True)
